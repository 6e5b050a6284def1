"""The processes of one Ray that `duetto cluster up` started: find them, stop them, and nothing else.

`up` starts `ray start --head` in a new process session and with DUETTO_CLUSTER_ID=<random> in its
environment; every process of that Ray inherits the variable (GCS, raylet, dashboard, agents, workers,
and job drivers, which Ray starts in sessions of their own). Matching on it, rather than on process
names as `ray stop` does, leaves every other Ray on the machine alone.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

MARKER_ENV = "DUETTO_CLUSTER_ID"


def cluster_processes(state) -> list:
    """Live processes of ``state`` (a ClusterState): those carrying its marker variable (job drivers
    too, which Ray starts in sessions of their own), or in the session `up` opened (any process whose
    environment cannot be read). This process and its parents never count."""
    import psutil

    me = psutil.Process()
    mine = {me.pid} | {p.pid for p in me.parents()}
    marker = f"{MARKER_ENV}={state.id}".encode()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in mine:
            continue
        try:
            in_session = os.getsid(proc.pid) == state.session_id and proc.create_time() >= state.started_at - 5
            if in_session or marker in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone, or another user's
    return found


def role(proc) -> str:
    """gcs, raylet, dashboard, agent, monitor, worker or other: for status lines and the stop order."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return "?"
    for needle, name in (("gcs_server", "gcs"), ("raylet/raylet", "raylet"), ("dashboard", "dashboard"),
                         ("ray::DashboardAgent", "agent"), ("ray::RuntimeEnvAgent", "agent"), ("log_monitor.py", "monitor"),
                         ("monitor.py", "monitor"), ("ray::", "worker"), ("default_worker.py", "worker")):  # fmt: skip
        if needle in cmd:
            return name
    return "other"


def terminate(procs: list, timeout: float = 15.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left; returns how many there were."""
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def stop(state, grace: float = 15.0) -> int:
    """Stop every process of this Ray in `ray stop`'s order; returns how many there were.

    The raylet goes first (its agents and workers fate-share with it) and the GCS last: a GCS stopped
    first leaves the raylet and the autoscaler retrying it, and they sit out SIGTERM until SIGKILL.
    """
    procs = cluster_processes(state)
    buckets: list[list] = [[], [], []]
    for p in procs:
        r = role(p)
        buckets[0 if r == "raylet" else 2 if r == "gcs" else 1].append(p)
    for bucket in buckets:
        if bucket:
            terminate(bucket, timeout=grace / 3)
    return len(procs)
