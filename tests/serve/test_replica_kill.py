"""A Generator replica killed (SIGKILL) under steady load: the requests it held are retried on the
restarted replica or refused with 503, never answered 500; the app then serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def _generator_pid() -> int:
    """The pid of the app's one Generator replica (its actor runs ``os.getpid`` for us)."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Generator" in a["name"]]
    assert len(names) == 1, names
    actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def test_killing_the_generator_under_load_gives_no_500(qlora_trial, galore_trial, free_ports):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from duetto.config import from_dict
    from duetto.serve.app import start
    from duetto.serve.config import ServeConfig

    small = {"num_cpus": 0.25, "max_batch_size": 4, "batch_wait_timeout_s": 0.05}
    cfg = from_dict(ServeConfig, {
        "generator": str(qlora_trial), "reranker": str(galore_trial), "port": free_ports(1)[0],
        "ensemble": {"k": 4, "max_new_tokens": 24}, "request_timeout_s": 60,
        "generator_deployment": small, "reranker_deployment": small, "ingress_deployment": {"num_cpus": 0.25},
    })  # fmt: skip
    from duetto.ray_connect import init_local

    init_local(num_cpus=2, include_dashboard=False)
    try:
        url = start(cfg)
        old_pid = _generator_pid()
        log: list[tuple[float, float, int]] = []  # (sent, answered, status) per request
        killed_at: list[float] = []

        async def client(c: httpx.AsyncClient, stop: float) -> None:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                r = await c.post("/v1/generate", json={"instruction": "Tell a long story about a cat."})
                log.append((t0, time.monotonic(), r.status_code))

        async def killer() -> None:
            await asyncio.sleep(3.0)  # steady load first
            os.kill(old_pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

        async def load() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=90) as c:
                stop = time.monotonic() + 25.0  # the kill, the restart (about 8 s here), then steady again
                await asyncio.gather(killer(), *(client(c, stop) for _ in range(4)))

        asyncio.run(load())
        (kill,) = killed_at
        codes = [status for _, _, status in log]
        assert set(codes) <= {200, 503}, codes
        spanning = [status for sent, answered, status in log if sent < kill < answered]
        assert spanning, "no request was in flight when the replica was killed"
        after = [status for sent, _, status in log if sent > kill]
        assert after.count(200) >= 4, codes  # it recovered
        assert _generator_pid() != old_pid  # a new replica process serves
    finally:
        serve.shutdown()
        ray.shutdown()
