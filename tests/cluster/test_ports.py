"""What a Ray that Duetto starts listens on: loopback only (docs/cluster.md, "What listens where")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from duetto.ray_connect import LOOPBACK_ENV, is_loopback

REPO = Path(__file__).resolve().parents[2]


def listeners(procs) -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, command line) of every listening TCP socket of ``procs`` (psutil processes)."""
    import psutil

    names = {}
    for p in procs:
        try:
            names[p.pid] = " ".join(p.cmdline())[:80] or p.name()
        except psutil.Error:
            pass
    return sorted((c.laddr.ip, c.laddr.port, c.pid, names[c.pid]) for c in psutil.net_connections("inet")
                  if c.status == psutil.CONN_LISTEN and c.pid in names)  # fmt: skip


def exposed(found: list[tuple]) -> list[tuple]:
    loopback = ("127.", "::1", "::ffff:127.")
    return [f for f in found if not f[0].startswith(loopback)]


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1:6379", "localhost:1", "[::1]:6379", "http://127.0.0.1:8265", "127.0.0.1"]))
    assert not any(map(is_loopback, ["10.0.0.5:6379", "0.0.0.0:6379", "auto", "", None]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_private_local_ray_listens_on_loopback_only():
    """`duetto train/sweep/serve` without an address: GCS, raylet, agents, dashboard, this driver and a
    worker all listen on loopback."""
    import psutil
    import ray

    from duetto.ray_connect import connect

    ray.shutdown()
    connect(num_cpus=1)
    try:
        worker_pid = ray.get(ray.remote(lambda: os.getpid()).remote())
        time.sleep(5)  # the dashboard's and agents' HTTP and metrics servers come up after ray.init returns
        me = psutil.Process()
        found = listeners([me, *me.children(recursive=True)])
        assert worker_pid in {pid for _, _, pid, _ in found}, found
        assert len(found) >= 6, found  # GCS, raylet x2, dashboard, agents, driver, worker
        assert exposed(found) == [], found
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    finally:
        ray.shutdown()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None  # nothing leaks into this process


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_up_listens_on_loopback_only_and_is_joined_there(free_ports):
    from duetto.cluster import local

    cdir = Path(tempfile.mkdtemp(prefix="dp-", dir="/tmp"))  # short: Ray's socket paths live under it
    port, dash = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    try:
        state = local.start(cdir, port=port, dashboard_port=dash, num_cpus=1)
        assert local.wait_ready(state) is not None
        time.sleep(3)
        found = listeners(local.cluster_processes(state))
        bound = {(ip.removeprefix("::ffff:"), p) for ip, p, _, _ in found}
        assert ("127.0.0.1", port) in bound and ("127.0.0.1", dash) in bound, found
        assert exposed(found) == [], found
        # A client with cluster env's variables, except the loopback one: duetto's join still finds the
        # head on loopback (plain Ray would dial the machine's routable address, where nothing listens).
        client = dict(env, **{k: v for k, v in state.client_env().items() if k not in LOOPBACK_ENV})
        code = ("import ray; from duetto.ray_connect import join; join(ray_address); "
                "print('CPU', ray.cluster_resources()['CPU'])").replace("ray_address", repr(state.address))  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=client,
                             cwd=REPO)  # fmt: skip
        assert "CPU 1.0" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    finally:
        leftover = local.load_state(cdir)
        if leftover is not None:
            local.stop(leftover)
        shutil.rmtree(cdir, ignore_errors=True)
