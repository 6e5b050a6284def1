"""Real sweeps on CPU with the tiny Gemma 3: configs/sweep_tiny.yaml end to end, kill-and-resume, and
`ray job submit` against a head this test starts on its own ports and temp dir.

Each runs the `duetto sweep` CLI in a subprocess, as a user would, and checks what it left on disk.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _tiny_sweep(path: Path, model_dir, data, storage: Path, **changes) -> Path:
    """configs/sweep_tiny.yaml with this test's model, data and storage, plus ``changes`` (dotted keys)."""
    sweep = yaml.safe_load((REPO / "configs" / "sweep_tiny.yaml").read_text())
    sweep["base"]["model"] = str(model_dir)
    sweep["base"]["data"].update(train=data[0], test=data[1])
    sweep["storage_path"] = str(storage)
    for key, value in changes.items():
        node = sweep
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _fail(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def test_sweep_tiny_end_to_end(tmp_path, tiny_gemma_dir, sweep_data, duetto_cli):
    """Three trials per method, two at a time. Within each method the first trial learns (a real learning
    rate) and the other two barely move (1e-8), so whichever of those reaches ASHA's first rung after
    the learner must be cut there: ASHA stopping a trial is certain, not luck."""
    sweep_dir = tmp_path / "sweep"
    path = _tiny_sweep(
        tmp_path / "s.yaml", tiny_gemma_dir, sweep_data, sweep_dir, num_samples=1,
        **{"methods.galore.learning_rate": {"grid": [3e-3, 1e-8, 1e-8]},
           "methods.qlora.learning_rate": {"grid": [3e-2, 1e-8, 1e-8]}, "base.data.val_size": 8},
    )
    proc = duetto_cli("sweep", str(path), "--num-cpus", "2")
    assert proc.returncode == 0, _fail(proc)
    assert "Trial status:" in proc.stdout  # Tune's progress table while it ran

    rows = _rows(sweep_dir)
    assert sorted(r["method"] for r in rows) == ["galore"] * 3 + ["qlora"] * 3
    statuses = [r["status"] for r in rows]
    assert set(statuses) <= {"completed", "stopped early"}, rows
    assert "stopped early" in statuses, "ASHA stopped no trial"
    for r in rows:
        assert float(r["eval_loss"]) > 0 and r["learning_rate"]
        assert r["eval_split"] == "validation"  # chosen on rows held out of train: the test split stays unseen
        trial_dir = Path(r["trial_dir"])
        assert trial_dir.parent == sweep_dir
        assert list(trial_dir.glob("events.out.tfevents.*")), "no TensorBoard log"
        assert float(r["peak_memory_bytes"]) > 0  # reported as it trains: stopped trials show it too
        if r["status"] == "completed":
            assert float(r["tokens_per_second"]) > 0 and float(r["wall_seconds"]) > 0
            assert r["bleu4"] != "" and r["rougeL"] != ""
            assert Path(r["model_dir"]).is_dir()
        else:
            assert r["model_dir"] == "" and int(r["step"]) < 12
    galore_cols = {"galore.rank", "galore.update_proj_gap", "galore.scale"}
    assert all(r[c] for r in rows if r["method"] == "galore" for c in galore_cols)
    assert all(not r[c] for r in rows if r["method"] == "qlora" for c in galore_cols)

    best = json.loads((sweep_dir / "best.json").read_text())
    assert set(best) == {"galore", "qlora"}
    for method, entry in best.items():
        done = [r for r in rows if r["method"] == method and r["status"] == "completed"]
        assert entry["metrics"]["eval_loss"] == pytest.approx(min(float(r["eval_loss"]) for r in done))
        assert entry["config"]["method"] == method and Path(entry["trial_dir"]).is_dir()
        weights = {"galore": "config.json", "qlora": "adapter_config.json"}[method]
        assert (Path(entry["model_dir"]) / weights).is_file()
    assert (sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (sweep_dir / "results.md").read_text()
    assert all(r["trial"] in md for r in rows) and "Best trial per method" in md
    assert "on a validation split held out of train" in md

    before = (sweep_dir / "results.csv").read_text()
    (sweep_dir / "results.csv").unlink()
    (sweep_dir / "best.json").unlink()
    proc = duetto_cli("sweep", "report", str(sweep_dir), timeout=300)
    assert proc.returncode == 0, _fail(proc)
    assert (sweep_dir / "results.csv").read_text() == before
    assert json.loads((sweep_dir / "best.json").read_text()) == best


def test_a_trial_that_keeps_failing_is_retried_then_reported(tmp_path, tiny_gemma_dir, sweep_data, duetto_cli):
    """LoRA on a module the model lacks passes the config checks but fails when the trial builds its
    model: Tune must run it 1 + trial_retries times, then the sweep exits 1 and says why."""
    sweep_dir = tmp_path / "sweep"
    path = _tiny_sweep(
        tmp_path / "s.yaml", tiny_gemma_dir, sweep_data, sweep_dir, num_samples=1,
        methods={"qlora": {"learning_rate": 1e-3, "target_modules": ["nope_proj"]}},
        **{"failures.trial_retries": 1, "failures.worker_retries": 0, "scheduler.type": "fifo"},
    )
    proc = duetto_cli("sweep", str(path), "--num-cpus", "2")
    assert proc.returncode == 1, _fail(proc)
    (row,) = _rows(sweep_dir)
    assert (row["status"], row["failures"]) == ("error", "2"), row
    assert "nope_proj" in row["error"], row
    assert "nope_proj" in (Path(row["trial_dir"]) / "error.txt").read_text()
    assert f"FAILED {row['trial']}" in proc.stdout
    md = (sweep_dir / "results.md").read_text()
    assert "## Errors" in md and "2 failed attempts" in md
    assert json.loads((sweep_dir / "best.json").read_text()) == {}


def _trial_dirs(sweep_dir: Path, method: str) -> list[Path]:
    return sorted(p for p in sweep_dir.glob(f"{method}_*") if p.is_dir())


def _terminated(sweep_dir: Path) -> set[str]:
    """Trials Tune's saved experiment state already records as finished."""
    from ray.tune import ExperimentAnalysis

    try:
        return {Path(t.path).name for t in ExperimentAnalysis(str(sweep_dir)).trials if t.status == "TERMINATED"}
    except Exception:  # noqa: BLE001 - the state file may be half rewritten this instant; ask again
        return set()


def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path, tiny_gemma_dir, sweep_data, duetto_cli):
    """One trial per method, one at a time, FIFO. Kill the driver (and the Ray it started) once the GaLore
    trial is finished and the QLoRA trial has a checkpoint; --resume must leave GaLore alone and
    continue QLoRA from its checkpoint."""
    sweep_dir = tmp_path / "sweep"
    steps = 24
    path = _tiny_sweep(
        tmp_path / "s.yaml", tiny_gemma_dir, sweep_data, sweep_dir, num_samples=1, max_concurrent_trials=1,
        **{"scheduler.type": "fifo", "base.max_steps": steps,
           "methods.galore.learning_rate": 3e-3, "methods.qlora.learning_rate": 3e-2},
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "duetto", "sweep", str(path), "--num-cpus", "2"], cwd=REPO,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 1500
            while time.time() < deadline:
                assert driver.poll() is None, (tmp_path / "first.log").read_text()[-6000:]
                galore, qlora = _trial_dirs(sweep_dir, "galore"), _trial_dirs(sweep_dir, "qlora")
                checkpointed = bool(qlora) and bool(list((qlora[0] / "train").glob("checkpoint_*")))
                if galore and checkpointed and galore[0].name in _terminated(sweep_dir):
                    break
                time.sleep(1)
            else:
                pytest.fail("the sweep never reached: GaLore finished and QLoRA checkpointed")
        finally:
            # The driver's own session holds it and the local Ray it started: our processes only.
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    galore, qlora = galore[0], qlora[0]
    galore_results = (galore / "result.json").read_text()
    galore_metrics = (galore / "metrics.json").stat().st_mtime_ns
    assert not (qlora / "metrics.json").exists(), "QLoRA was meant to be cut mid-run"
    checkpoints = list((qlora / "train").glob("checkpoint_*"))  # one per report, every 4 steps

    proc = duetto_cli("sweep", "--resume", str(sweep_dir), "--num-cpus", "2",
                      env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    assert proc.returncode == 0, _fail(proc)
    assert (galore / "result.json").read_text() == galore_results, "the finished GaLore trial ran again"
    assert (galore / "metrics.json").stat().st_mtime_ns == galore_metrics
    final = json.loads((qlora / "metrics.json").read_text())
    assert final["step"] == steps
    assert 4 <= final["resumed_from_step"] <= 4 * len(checkpoints) <= steps, (final, checkpoints)
    assert {r["status"] for r in _rows(sweep_dir)} == {"completed"}


# ------------------------------------------------------------------------------------------------
# ray job submit
# ------------------------------------------------------------------------------------------------




def _session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid``: what one `ray start` started, and nothing of anyone else's."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # after "pid (comm)": state ppid pgrp session ...
                pids.append(int(entry.name))
    return pids


def _stop_head(head: subprocess.Popen) -> None:
    """Stop only this head: SIGTERM to `ray start --block` (it shuts its node down), then kill whatever
    is left in its process session. Never `ray stop`, which would stop every Ray on the machine."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_pids(head.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if head.poll() is None:
        head.wait(timeout=30)
    deadline = time.time() + 30
    while _session_pids(head.pid) and time.time() < deadline:  # SIGKILL is delivered, not yet done
        time.sleep(0.5)


def test_ray_job_submit_against_a_local_head(tmp_path, tiny_gemma_dir, sweep_data, free_ports):
    venv_bin = Path(sys.executable).parent
    ports = dict(zip(
        ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"],
        free_ports(9),
    ))
    # Ray's unix socket paths must stay under 107 bytes: a short temp dir of our own, not pytest's.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "head.log", "w") as head_log:
        head = subprocess.Popen(
            [str(venv_bin / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
             *[f"--{k}={v}" for k, v in ports.items()]],
            env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 180
        while True:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=5).read()
                break
            except OSError:
                assert time.time() < deadline, "the head's dashboard never answered"
                time.sleep(2)

        sweep_dir = tmp_path / "sweep"
        train, test = sweep_data
        # The shipped file, from the uploaded working dir; absolute paths for what lives outside it.
        submit = subprocess.run(
            [str(venv_bin / "ray"), "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
             "duetto", "sweep", "configs/sweep_tiny.yaml", f"base.model={tiny_gemma_dir}", f"base.data.train={train}",
             f"base.data.test={test}", f"storage_path={sweep_dir}", "num_samples=1", "scheduler.type=fifo",
             "base.max_steps=8"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False,
        )
        assert submit.returncode == 0, _fail(submit)
        assert "succeeded" in submit.stdout
        # the job joined this head, it did not start a Ray of its own
        assert "Connecting to existing Ray cluster" in submit.stdout + submit.stderr
        rows = _rows(sweep_dir)
        assert sorted((r["method"], r["status"]) for r in rows) == [("galore", "completed"), ("qlora", "completed")]
        assert set(json.loads((sweep_dir / "best.json").read_text())) == {"galore", "qlora"}
    finally:
        _stop_head(head)
    assert not _session_pids(head.pid), "processes of the test's head survived"
    shutil.rmtree(temp_dir, ignore_errors=True)
