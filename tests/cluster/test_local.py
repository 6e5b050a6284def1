"""`duetto cluster up|down|status|env`: the local head, and that `down` stops only what `up` started."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from duetto.cluster import local
from duetto.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "duetto", "cluster"]


def _state(tmp_path: Path, **kw) -> local.ClusterState:
    fields = dict(id="abc123", dir=str(tmp_path), temp_dir=str(tmp_path / "ray"), session_id=0, started_at=time.time(),
                  node_ip="127.0.0.1", port=6390, dashboard_port=8290, client_port=40001, auth="token",
                  token_path=str(tmp_path / "auth_token"))  # fmt: skip
    fields.update(kw)
    return local.ClusterState(**fields)


def test_registered_in_the_cli_table():
    from duetto.cli import COMMANDS

    assert COMMANDS["cluster"][0] == "duetto.cluster.local"
    parser = argparse.ArgumentParser()
    local.configure(parser)
    args = parser.parse_args(["up", "--port", "7000", "--auth", "disabled", "--num-gpus", "1"])
    assert (args.action, args.port, args.auth, args.num_gpus) == ("up", 7000, "disabled", 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["restart"])


def test_state_file_round_trip_and_client_env(tmp_path):
    state = _state(tmp_path)
    local.save_state(state)
    again = local.load_state(tmp_path)
    assert again == state
    env = again.client_env()
    assert env == {
        "RAY_ADDRESS": "127.0.0.1:6390",
        "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:8290",
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "auth_token"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a loopback head: clients join it on loopback
    }
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in _state(tmp_path, node_ip="10.1.2.3").client_env()
    # what `eval "$(duetto cluster env)"` runs sets exactly these in a POSIX shell
    script = local.env_lines(again) + 'echo "$RAY_ADDRESS|$RAY_API_SERVER_ADDRESS|$RAY_AUTH_MODE|$RAY_AUTH_TOKEN_PATH"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"127.0.0.1:6390|http://127.0.0.1:8290|token|{tmp_path / 'auth_token'}"
    assert "RAY_AUTH_TOKEN_PATH" not in _state(tmp_path, auth="disabled", token_path="").client_env()
    (tmp_path / local.STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="cluster.json"):
        local.load_state(tmp_path)


def test_submit_command_writes_results_into_the_checkout(monkeypatch, tmp_path):
    """The printed `ray job submit` line: the study sweep, its folder and data as absolute paths here."""
    from duetto.tune.spec import load_sweep

    monkeypatch.chdir(REPO)
    argv = local.submit_command(_state(tmp_path))
    assert argv[:5] == ["ray", "job", "submit", "--address", "http://127.0.0.1:8290"]
    assert argv[5:8] == ["--working-dir", ".", "--"]
    sweep_argv = argv[8:]
    assert sweep_argv[:4] == ["duetto", "sweep", "run", local.SWEEP_FILE]
    overrides = dict(a.split("=", 1) for a in sweep_argv[4:])
    assert overrides["storage_path"] == str(REPO / "duetto-runs" / "sweeps" / load_sweep(local.SWEEP_FILE).name)
    for key in ("base.data.train", "base.data.test"):
        assert Path(overrides[key]).is_absolute() and overrides[key].startswith(str(REPO))
    # the job (in Ray's copy of the checkout) accepts them and lands in this checkout
    sweep = load_sweep(local.SWEEP_FILE, sweep_argv[4:])
    monkeypatch.chdir(tmp_path)
    assert sweep.sweep_dir() == Path(overrides["storage_path"])
    assert local.submit_command(None)[-1] == local.SWEEP_FILE  # elsewhere: no sweep file, no overrides


def test_submit_command_reads_the_sweep_without_the_tune_stage(monkeypatch, tmp_path):
    """A sweep folder and data paths taken from the YAML's plain keys, over the trial config's, over defaults."""
    (tmp_path / "trial.yaml").write_text("data:\n  train: t/train.jsonl\n  test: t/test.jsonl\n")
    (tmp_path / "sweep.yaml").write_text("trial_config: trial.yaml\nbase:\n  data.test: b/test.jsonl\n")
    monkeypatch.chdir(tmp_path)
    overrides = dict(a.split("=", 1) for a in local.submit_command(None, "sweep.yaml")[10:])
    assert overrides == {"storage_path": str(tmp_path / "duetto-runs" / "sweeps" / "sweep"),
                         "base.data.train": str(tmp_path / "t" / "train.jsonl"),
                         "base.data.test": str(tmp_path / "b" / "test.jsonl")}  # fmt: skip
    code = ("import sys; from duetto.cluster import local; local.submit_command(None, 'sweep.yaml'); "
            "print(sorted(m for m in sys.modules if m.startswith('duetto.tune')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_up_refuses_what_would_fail_later(tmp_path):
    with pytest.raises(ConfigError, match="--auth"):
        local.start(tmp_path, auth="none")
    with pytest.raises(ConfigError, match="--dir.*too long"):
        local.start(tmp_path / ("x" * 80))
    tmp_path = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))  # short enough for Ray's sockets
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port: port {busy}"):
            local.start(tmp_path, port=busy, dashboard_port=local.free_port())
        with pytest.raises(ConfigError, match=f"--dashboard-port: port {busy}"):
            local.start(tmp_path, port=local.free_port(), dashboard_port=busy)
    assert not (tmp_path / local.STATE_FILE).exists() and not (tmp_path / "ray").exists()
    tmp_path.rmdir()


def _sleeper(marker: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(local.MARKER_ENV, None)
    if marker:
        env[local.MARKER_ENV] = marker
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)


def test_stop_ends_only_processes_carrying_its_marker(tmp_path):
    """The mechanism `down` relies on, without Ray: same-user processes, one marked, one not."""
    ours, other, foreign = _sleeper("abc123"), _sleeper(None), _sleeper("someone-else")
    try:
        time.sleep(0.5)
        state = _state(tmp_path, session_id=-1)  # no session: the marker alone must find it
        assert [p.pid for p in local.cluster_processes(state)] == [ours.pid]
        assert local.stop(state, grace=6) == 1
        assert ours.wait(timeout=10) is not None
        assert other.poll() is None and foreign.poll() is None
        assert local.cluster_processes(state) == []
    finally:
        for p in (ours, other, foreign):
            p.kill()
            p.wait()


def test_commands_without_a_cluster(tmp_path):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    status = subprocess.run(CLI + ["status", "--dir", str(tmp_path)], capture_output=True, text=True, env=env)
    assert status.returncode == 1 and "not running" in status.stdout
    down = subprocess.run(CLI + ["down", "--dir", str(tmp_path)], capture_output=True, text=True, env=env)
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    envcmd = subprocess.run(CLI + ["env", "--dir", str(tmp_path)], capture_output=True, text=True, env=env)
    assert envcmd.returncode == 1 and "duetto cluster up" in envcmd.stderr


# ---------------------------------------------------------------------------------------------
# the real thing: up, submit a job, status, down, with another Ray beside it
# ---------------------------------------------------------------------------------------------




@pytest.mark.slow
@pytest.mark.timeout(900)
def test_up_submit_status_down_leaves_other_rays_alone(free_ports):
    import ray

    # A short --dir: Ray's unix socket paths live under it (tmp_path is too long for them).
    cdir = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))
    port, dash = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"

    def cli(*args, timeout=600, **kw):
        return subprocess.run(CLI + list(args) + ["--dir", str(cdir)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO, **kw)  # fmt: skip

    # Another Ray on this machine, started the usual way: it must outlive `duetto cluster down`.
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        other_node = ray.get_runtime_context().get_node_id()
        up = cli("up", "--port", str(port), "--dashboard-port", str(dash), "--num-cpus", "2")
        assert up.returncode == 0, up.stdout + up.stderr
        state = local.load_state(cdir)
        assert state is not None and state.auth == "token"
        assert f"127.0.0.1:{port}" in up.stdout and "2.0 CPU" in up.stdout
        # the printed submit line is the study sweep with its folder in this checkout
        line = next(ln.strip() for ln in up.stdout.splitlines() if "ray job submit" in ln and "--working-dir" in ln)
        argv = shlex.split(line)
        assert "RAY_AUTH_MODE=token" in argv and f"RAY_AUTH_TOKEN_PATH={state.token_path}" in argv
        assert argv[argv.index("--") + 1 :][:4] == ["duetto", "sweep", "run", local.SWEEP_FILE]
        assert f"storage_path={REPO / 'duetto-runs' / 'sweeps' / 'study'}" in argv

        status = cli("status")
        assert status.returncode == 0 and "1 alive" in status.stdout, status.stdout + status.stderr

        # A job through the printed settings: `ray job submit` with `duetto cluster env`'s variables.
        exports = cli("env").stdout
        job_env = dict(env, **{k: v for k, v in (ln.split(" ", 1)[1].split("=", 1) for ln in exports.splitlines())})
        probe = ("import ray, duetto.trainers.trial, duetto.tune.sweep; ray.init(); "
                 "print('JOB', int(ray.cluster_resources()['CPU']), ray.get_runtime_context().get_node_id())")  # fmt: skip
        ray_cli = local._ray_cli()  # this interpreter's `ray`
        job = subprocess.run(ray_cli + ["job", "submit", "--working-dir", ".", "--", "python", "-c", probe],
                             capture_output=True, text=True, timeout=300, env=job_env, cwd=REPO)  # fmt: skip
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        job_line = next(ln for ln in job.stdout.splitlines() if ln.startswith("JOB "))
        assert job_line.split()[1] == "2" and job_line.split()[2] != other_node  # ran on our head, not the other Ray
        # without the token, the same cluster refuses
        no_auth = {k: v for k, v in job_env.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(ray_cli + ["job", "list"], capture_output=True, text=True, timeout=120, env=no_auth)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

        assert local.cluster_processes(state), "up reported success but none of its processes is alive"
        down = cli("down")
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        assert local.cluster_processes(state) == []
        assert not (cdir / local.STATE_FILE).exists() and not Path(state.token_path).exists()
        assert cli("status").returncode == 1

        # the other Ray still runs tasks
        @ray.remote
        def ping():
            return ray.get_runtime_context().get_node_id()

        assert ray.get(ping.remote(), timeout=120) == other_node
    finally:
        leftover = local.load_state(cdir)
        if leftover is not None:
            local.stop(leftover)
        ray.shutdown()
        shutil.rmtree(cdir, ignore_errors=True)
