"""Joining or starting Ray, one way for every command (train, sweep, serve, demo, report, benchmarks).

A Ray that Duetto starts on its own listens on loopback only. Ray binds its gRPC servers (GCS, raylet,
every worker) to all interfaces unless the node's address is 127.0.0.1, and on Linux it replaces a
loopback node address by the machine's routable one unless it is told the Ray is single-machine
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the setting macOS and Windows default to). ``LOOPBACK_ENV``
is that setting; `duetto cluster up` starts its head with it and `duetto cluster env` exports it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any

from duetto.config import ConfigError

LOOPBACK = "127.0.0.1"
#: Environment of a Ray (its daemons, workers and clients) that stays on this machine.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback(address: str | None) -> bool:
    """``127.0.0.1:6379`` / ``localhost:6379`` / ``[::1]:6379``: a Ray on this machine's loopback."""
    if not address:
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


@contextmanager
def loopback_node():
    """While Ray starts or joins: its node address is 127.0.0.1, for the daemons it spawns (environment)
    and for this process (Ray read the same variable into ``ray_constants`` when it was imported)."""
    import ray._private.ray_constants as ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environ(LOOPBACK_ENV):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def init_local(**ray_init_kwargs: Any) -> None:
    """``ray.init`` of a new private Ray bound to loopback. ``address="local"`` makes ray.init start one
    even when RAY_ADDRESS or a `ray start` head exists, rather than silently joining that one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with loopback_node():
        ray.init(address="local", _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **ray_init_kwargs)


def join(address: str) -> None:
    """``ray.init`` of a running cluster: ``auto`` (the `ray start` head of this machine) or HOST:PORT.
    A loopback head (`duetto cluster up`) is joined on loopback: Ray would otherwise dial the routable
    address, where that head does not listen."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment("auto", None)
        address = found if found and found != "auto" else address
    with loopback_node() if is_loopback(address) else nullcontext():
        ray.init(address=address)


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join a running cluster (``address``, RAY_ADDRESS, or the job's own under `ray job submit`),
    else start a local Ray with the given CPUs/GPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if num_cpus is not None or num_gpus is not None:
            raise ConfigError("--num-cpus/--num-gpus size a local Ray; a joined cluster has its own resources")
        join(address)
    else:
        _start_local(num_cpus, num_gpus)


def _start_local(num_cpus: int | None, num_gpus: int | None) -> None:
    """A private local Ray whose every process knows its own address.

    Train V2 frees the placement group of a trial ASHA killed only once its PlacementGroupCleaner actor
    has asked the State API (the dashboard) whether the trial's controller is dead. That actor finds the
    cluster through RAY_ADDRESS, else through whichever Ray started last on the machine; asking the wrong
    one, it gives up and every stopped trial keeps its CPUs/GPUs until the sweep starves. So: the
    dashboard on, the GCS on a port chosen here, and RAY_ADDRESS in the environment the daemons inherit.
    """
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    with _environ({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{LOOPBACK}:{port}"}):
        init_local(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True)


@contextmanager
def _environ(values: dict[str, str]):
    """``values`` set in os.environ while the block runs, then each key as it was."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
