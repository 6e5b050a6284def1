"""Joining or starting Ray, one way for every command (train, sweep, demo, report, benchmarks)."""

from __future__ import annotations

import os

from duetto.config import ConfigError


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join a running cluster (``address``, RAY_ADDRESS, or the job's own under `ray job submit`),
    else start a local Ray with the given CPUs/GPUs."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if num_cpus is not None or num_gpus is not None:
            raise ConfigError("--num-cpus/--num-gpus size a local Ray; a joined cluster has its own resources")
        ray.init(address=address)
    else:
        _start_local(num_cpus, num_gpus)


def _start_local(num_cpus: int | None, num_gpus: int | None) -> None:
    """A private local Ray whose every process knows its own address.

    Train V2 frees the worker placement group of a trial that ASHA killed only after its
    PlacementGroupCleaner actor asks the State API (served by the dashboard) whether the trial's
    controller is dead. That actor finds the cluster through RAY_ADDRESS, else through whichever Ray
    started last on the machine; with a second Ray around (other sweeps, tests, a `ray start` head)
    it asks the wrong one, gives up, and every stopped trial keeps its CPUs/GPUs until the sweep
    starves. So: the dashboard on, the GCS on a port chosen here, and RAY_ADDRESS pointing at it in
    the environment the Ray daemons (and so all workers) inherit. ``address="local"`` makes ray.init
    itself ignore that RAY_ADDRESS and start a new Ray rather than join another one.
    """
    import socket

    import ray
    from ray._private.services import get_node_ip_address

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
