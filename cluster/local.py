"""`duetto cluster up|down|status|env`: a local Ray head that `ray job submit` can use, and stop it cleanly.

    duetto cluster up                  start a head (ray start --head); print the `ray job submit` line
    eval "$(duetto cluster env)"       point ray job submit / duetto serve at it (RAY_ADDRESS, auth)
    duetto cluster status              is it up; its resources
    duetto cluster down                stop exactly the Ray that `up` started

Why not plain `ray start` / `ray stop` (docs/cluster.md has the details): `up` sets the auth mode
explicitly (Ray 2.60 turns token auth on by itself), turns usage stats off, chooses secondary ports free,
and marks every process of its Ray with DUETTO_CLUSTER_ID, recorded in DIR/cluster.json with the rest;
`down` stops the processes so marked (cluster/processes.py), where `ray stop` kills every Ray of the user.
Only the standard library is imported at module level; psutil loads inside functions.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duetto.cluster.processes import MARKER_ENV, cluster_processes, role, stop

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
SWEEP_FILE = "configs/sweep_study.yaml"
#: Where a sweep without storage_path keeps its folder (as tune/spec.py SWEEPS_ROOT; cluster reads no tune code).
SWEEPS_ROOT = "duetto-runs/sweeps"
AUTH_MODES = ("token", "disabled")
#: Ray puts unix sockets at TEMP/session_<date>_<pid>/sockets/plasma_store; Linux caps such a path at
#: 107 bytes, and Ray's own error for a longer one is obscure.
_SOCKET_TAIL = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
_MAX_SOCKET_PATH = 107


def default_dir() -> Path:
    """``$DUETTO_CACHE/cluster`` (``~/.cache/duetto/cluster``): state, token and Ray's temp dir."""
    from duetto.model_cache import cache_root

    return cache_root() / "cluster"


@dataclass
class ClusterState:
    """What `up` started: everything `status`, `env` and `down` need, saved as DIR/cluster.json."""

    id: str
    """Value of DUETTO_CLUSTER_ID in the environment of every process of this Ray."""
    dir: str
    temp_dir: str
    """Ray's --temp-dir: its session folders (logs) live here."""
    session_id: int
    """Process session of `ray start` (its pid): Ray's daemons and workers stay in it."""
    started_at: float
    node_ip: str
    port: int
    dashboard_port: int
    client_port: int
    auth: str
    token_path: str = ""
    ray_start: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """GCS address: what ``ray.init(address=...)`` and RAY_ADDRESS take."""
        return f"{self.node_ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs API / dashboard: what ``ray job submit --address`` takes."""
        return f"http://{self.node_ip}:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """Variables a client needs: ray job submit, ray status, and `duetto serve`/`sweep` joining it."""
        env = {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": self.auth,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        if self.auth == "token":
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        env.update(_loopback_env(self.node_ip))
        return env


# --- state file ---


def state_path(cluster_dir: str | Path) -> Path:
    return Path(cluster_dir).expanduser().resolve() / STATE_FILE


def load_state(cluster_dir: str | Path) -> ClusterState | None:
    path = state_path(cluster_dir)
    if not path.is_file():
        return None
    try:
        return ClusterState(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        from duetto.config import ConfigError

        raise ConfigError(f"{path}: not a state file written by `duetto cluster up` ({e}); remove it if no Ray runs from it") from None


def save_state(state: ClusterState) -> None:
    path = state_path(state.dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)


# --- up ---


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _ray_cli() -> list[str]:
    """The `ray` of this interpreter (not whichever is first on PATH)."""
    exe = Path(sys.executable).parent / "ray"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def _loopback_env(host: str) -> dict[str, str]:
    """What keeps a head on ``host`` and its clients on loopback (duetto/ray_connect.py says why)."""
    from duetto.ray_connect import LOOPBACK_ENV, is_loopback

    return dict(LOOPBACK_ENV) if is_loopback(host) else {}


def start(
    cluster_dir: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 6379,
    dashboard_port: int = 8265,
    client_port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    auth: str = "token",
    timeout: float = 300.0,
) -> ClusterState:
    """Start the head and return its state (also saved to DIR/cluster.json).

    Raises ConfigError for anything the user can fix (port taken, path too long, already running) and
    RuntimeError when `ray start` itself fails; in that case whatever it had started is stopped.
    """
    from duetto.config import ConfigError

    if auth not in AUTH_MODES:
        raise ConfigError(f"--auth: must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
    cdir = Path(cluster_dir).expanduser().resolve() if cluster_dir else default_dir()
    existing = load_state(cdir)
    if existing is not None and cluster_processes(existing):
        raise ConfigError(f"--dir: a cluster started from {cdir} is already running at {existing.address}; "
                          f"`duetto cluster down --dir {cdir}` first, or use another --dir")  # fmt: skip
    temp_dir = cdir / "ray"
    if len(str(temp_dir)) + _SOCKET_TAIL > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"--dir: {cdir} is too long for Ray's unix sockets (paths under {temp_dir} must stay within "
            f"{_MAX_SOCKET_PATH} bytes); choose a shorter one, e.g. --dir /tmp/duetto-cluster"
        )
    for flag, p in (("--port", port), ("--dashboard-port", dashboard_port), ("--client-port", client_port)):
        if p and port_taken(host, p):
            raise ConfigError(f"{flag}: port {p} on {host} is in use (another Ray?); pick a free one with {flag}")
    if client_port is None:
        client_port = free_port(host)  # Ray's default 10001 collides with a second Ray on the machine
    temp_dir.mkdir(parents=True, exist_ok=True)

    cluster_id = secrets.token_hex(8)
    token_path = cdir / TOKEN_FILE
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({MARKER_ENV: cluster_id, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": auth}, **_loopback_env(host))
    # Ray code that looks up "its" cluster without an address (the state API, e.g. from Ray Train's
    # PlacementGroupCleaner) otherwise picks whichever Ray on the machine started last.
    env["RAY_ADDRESS"] = f"{host}:{port}"
    # Job entrypoints run with this PATH: put our interpreter's bin first so `duetto` is found there.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if auth == "token":  # a token of its own, readable by this user alone
        with os.fdopen(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)

    cmd = _ray_cli() + [
        "start", "--head",
        f"--node-ip-address={host}", f"--port={port}",
        "--include-dashboard=true", f"--dashboard-host={host}", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        # Every port Ray would otherwise fix (52365 for the agent) is chosen free, so a second Ray on this
        # machine (a test's ray.init, another user's head) neither blocks this one nor is blocked by it.
        f"--dashboard-agent-listen-port={free_port(host)}", f"--dashboard-agent-grpc-port={free_port(host)}",
        f"--runtime-env-agent-port={free_port(host)}", f"--metrics-export-port={free_port(host)}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    for flag, value in (("num-cpus", num_cpus), ("num-gpus", num_gpus), ("object-store-memory", object_store_memory)):
        if value is not None:
            cmd.append(f"--{flag}={value}")

    log = cdir / "ray-start.log"
    for attempt in (1, 2):
        started_at = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=str(cdir), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        state = ClusterState(
            id=cluster_id, dir=str(cdir), temp_dir=str(temp_dir), session_id=proc.pid, started_at=started_at,
            node_ip=host, port=port, dashboard_port=dashboard_port, client_port=client_port, auth=auth,
            token_path=str(token_path) if auth == "token" else "", ray_start=cmd,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n(ray start did not return within {timeout:.0f} s)"
        log.write_text(out)
        if proc.returncode == 0:
            break
        left = stop(state, grace=10)
        # Ray gives the raylet a fixed 30 s to register; on a machine busy with other work that can pass.
        if attempt == 1 and "timed out during startup" in out:
            print(f"duetto cluster: `ray start` timed out registering the node (busy machine?); stopped {left} "
                  "process(es) it had started, trying once more", file=sys.stderr)  # fmt: skip
            continue
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise RuntimeError(f"`ray start` failed (exit {proc.returncode}); stopped {left} process(es) it had started. "
                           f"Full output: {log}\n{tail}")  # fmt: skip
    save_state(state)
    return state


# --- status, env, submit line ---


def _get(state: ClusterState, path: str, timeout: float = 10.0) -> str:
    req = urllib.request.Request(state.dashboard_url + path)
    if state.auth == "token":
        req.add_header("Authorization", f"Bearer {Path(state.token_path).read_text().strip()}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def resources_text(state: ClusterState) -> str | None:
    """`ray status`'s report, read from the dashboard (no Ray import); None while it is not answering."""
    try:
        body = json.loads(_get(state, "/api/cluster_status?format=1"))
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return None
    data = body.get("data", {})
    text = data.get("clusterStatus") or data.get("cluster_status")
    return text if isinstance(text, str) and text.strip() else None


def wait_ready(state: ClusterState, timeout: float = 60.0) -> str | None:
    """Wait until the dashboard reports the head's resources (jobs can be submitted from then on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = resources_text(state)
        if text and "Resources" in text:
            return text
        time.sleep(1.0)
    return None


def env_lines(state: ClusterState, unset: bool = False) -> str:
    env = state.client_env()
    if unset:
        return "unset " + " ".join(env) + "\n"
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def submit_command(state: ClusterState | None = None, sweep_file: str = SWEEP_FILE) -> list[str]:
    """The `ray job submit` command for the study sweep, to run from the repository root (the cwd).

    The job runs in Ray's upload of the checkout (``--working-dir .``), which leaves out what .gitignore
    ignores (duetto-runs/): so the sweep folder and its data are given as absolute paths into this
    checkout, read from the YAML's plain keys (the sweep validates the rest when it starts).
    """
    cmd = ["ray", "job", "submit"]
    if state is not None:
        cmd += ["--address", state.dashboard_url]
    cmd += ["--working-dir", ".", "--", "duetto", "sweep", "run", sweep_file]
    if not Path(sweep_file).is_file():
        return cmd
    storage, data = sweep_paths(sweep_file)
    return cmd + [f"storage_path={storage}", f"base.data.train={data['train']}", f"base.data.test={data['test']}"]


def sweep_paths(sweep_file: str) -> tuple[Path, dict[str, Path]]:
    """(sweep folder, {"train", "test"} data files) of a sweep YAML, absolute against the cwd: its
    ``storage_path`` (else ``duetto-runs/sweeps/<name>``), and ``base.data`` over the ``data`` of its
    ``trial_config`` over the trial defaults."""
    from duetto.config import merge_dicts, nest, read_yaml
    from duetto.trainers.config import DataPaths

    sweep = nest(read_yaml(sweep_file))
    storage = Path(sweep.get("storage_path") or f"{SWEEPS_ROOT}/{sweep.get('name') or 'sweep'}")
    data = {"train": DataPaths.train, "test": DataPaths.test}
    if sweep.get("trial_config"):
        data = merge_dicts(data, nest(read_yaml(sweep["trial_config"])).get("data") or {})
    data = merge_dicts(data, (sweep.get("base") or {}).get("data") or {})
    return storage.expanduser().resolve(), {k: Path(data[k]).expanduser().resolve() for k in ("train", "test")}


def _submit_text(state: ClusterState) -> str:
    from duetto.config import ConfigError

    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in state.client_env().items() if k.startswith("RAY_AUTH"))
    try:
        cmd = submit_command(state)
    except ConfigError as e:
        return f"(cannot read {SWEEP_FILE} here: {e})"
    note = "" if Path(SWEEP_FILE).is_file() else f"   # run it from the repository root ({SWEEP_FILE} is not under {Path.cwd()})"
    return f"{prefix} {' '.join(shlex.quote(c) for c in cmd)}".strip() + note


def describe(state: ClusterState, procs: list, resources: str | None) -> str:
    roles = Counter(role(p) for p in procs)
    lines = [
        f"  address    {state.address}      (RAY_ADDRESS; ray.init, duetto serve/sweep --address)",
        f"  dashboard  {state.dashboard_url}  (ray job submit --address; the web UI)",
        f"  auth       {state.auth}" + (f" (token in {state.token_path})" if state.auth == "token" else " (anyone who reaches the ports can run code)"),
        f"  processes  {len(procs)} ({', '.join(f'{n} {r}' for r, n in sorted(roles.items()))})",
        f"  logs       {state.temp_dir}/session_latest/logs",
    ]  # fmt: skip
    if resources:
        nodes, usage = summarize_status(resources)
        lines += [f"  nodes      {nodes} alive", f"  resources  {', '.join(usage)}"]
    return "\n".join(lines)


def summarize_status(text: str) -> tuple[int, list[str]]:
    """(alive nodes, ["0.0/16.0 CPU", "0.0/1.0 GPU", ...]) from `ray status`'s text."""
    nodes, usage, section = 0, [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith(":") and not line.startswith(("node_", "(")):
            section = line[:-1]
            continue
        if not line or line.startswith("("):
            continue
        if section == "Active" and "node_" in line:
            nodes += 1
        elif section == "Total Usage":
            usage.append(line)
    return nodes, usage


# --- CLI ---


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 2)[1]
    parser.add_argument("action", choices=["up", "down", "status", "env"], help="what to do")
    parser.add_argument("--dir", default=None, help="state, auth token and Ray temp dir (default ~/.cache/duetto/cluster, under $DUETTO_CACHE)")
    g = parser.add_argument_group("up")
    g.add_argument("--host", default="127.0.0.1", help="node address; 127.0.0.1 keeps it on this machine (default)")
    g.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
    g.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / jobs API port (default 8265)")
    g.add_argument("--client-port", type=int, default=None, help="Ray Client port (default: a free one)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs to offer (default: Ray detects)")
    g.add_argument("--num-gpus", type=int, default=None, help="GPUs to offer (default: Ray detects CUDA_VISIBLE_DEVICES / the driver)")
    g.add_argument("--object-store-memory", type=int, default=None, metavar="BYTES", help="object store size (default: Ray's)")
    g.add_argument("--auth", choices=AUTH_MODES, default="token",
                   help="token (default): clients need the token file `duetto cluster env` names; disabled: no auth")  # fmt: skip
    g.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for `ray start` (and for down: before SIGKILL)")
    parser.add_argument("--unset", action="store_true", help="env: print `unset` lines instead of exports")


def run(args: argparse.Namespace) -> int:
    cdir = Path(args.dir).expanduser().resolve() if args.dir else default_dir()
    if args.action == "up":
        return _up(args, cdir)
    state = load_state(cdir)
    if args.action == "env":
        if state is None:
            print(f"duetto cluster env: no cluster recorded in {cdir} (run `duetto cluster up`)", file=sys.stderr)
            return 1
        sys.stdout.write(env_lines(state, unset=args.unset))
        return 0
    if args.action == "status":
        if state is None:
            print(f"duetto cluster: not running (nothing recorded in {cdir})")
            return 1
        procs = cluster_processes(state)
        if not procs:
            print(f"duetto cluster: not running (recorded in {state_path(cdir)}, but none of its processes is alive)")
            return 1
        print(f"duetto cluster: running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.started_at))}")
        print(describe(state, procs, resources_text(state)))
        return 0
    # down
    if state is None:
        print(f"duetto cluster: nothing to stop (no cluster recorded in {cdir})")
        return 0
    procs = cluster_processes(state)
    n = stop(state) if procs else 0
    left = cluster_processes(state)
    if left:
        print(f"duetto cluster: {len(left)} process(es) survived SIGKILL: {[p.pid for p in left]}", file=sys.stderr)
        return 1
    state_path(cdir).unlink(missing_ok=True)
    if state.token_path:
        Path(state.token_path).unlink(missing_ok=True)
    print(f"duetto cluster: stopped {n} process(es) of the Ray at {state.address}; logs stay in {state.temp_dir}")
    if os.environ.get("RAY_ADDRESS") == state.address:
        print(f"  this shell still points at it; clear that with: unset {' '.join(state.client_env())}")
    return 0


def _up(args: argparse.Namespace, cdir: Path) -> int:
    existing = load_state(cdir)
    if existing is not None:
        procs = cluster_processes(existing)
        if procs:
            print(f"duetto cluster: already running (started from {cdir})")
            print(describe(existing, procs, resources_text(existing)))
            print(f"\nSubmit the study sweep:\n  {_submit_text(existing)}")
            return 0
    try:
        state = start(cdir, host=args.host, port=args.port, dashboard_port=args.dashboard_port,
                      client_port=args.client_port, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                      object_store_memory=args.object_store_memory, auth=args.auth, timeout=args.timeout)  # fmt: skip
    except RuntimeError as e:
        print(f"duetto cluster up: {e}", file=sys.stderr)
        return 1
    resources = wait_ready(state)
    procs = cluster_processes(state)
    dir_arg = f" --dir {shlex.quote(str(cdir))}" if args.dir else ""
    print(f"duetto cluster: Ray head started (state {state_path(cdir)})")
    print(describe(state, procs, resources))
    if resources is None:
        print("  (the dashboard has not reported resources yet; `duetto cluster status` shows them once it does)")
    print("\nPoint this shell at it (ray job submit, ray status, duetto serve):")
    print('  eval "$(duetto cluster env' + dir_arg + ')"')
    print("Submit the study sweep (from the repository root):")
    print(f"  {_submit_text(state)}")
    print("Stop it (only this Ray):\n  duetto cluster down" + dir_arg)
    return 0
