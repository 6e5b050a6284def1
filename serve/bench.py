"""A bounded, loopback-only load generator: C closed-loop clients for S seconds against one route.

Each client sends a request, waits for the answer, and sends the next until the deadline; requests
still in flight at the deadline are awaited (bounded by the per-request timeout) and counted. The
result is throughput, latency percentiles of the successful requests, and errors by kind. Only
loopback hosts are accepted so this cannot be pointed at someone else's server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import math
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_CONCURRENCY = 256
MAX_DURATION_S = 3600.0

#: Prompts cycled through by the load generator (distinct, so no layer can cache an answer).
DEFAULT_INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn rain.",
    "Summarize the plot of Romeo and Juliet.",
    "List four uses of a paperclip.",
    "Describe how photosynthesis works to a child.",
    "Translate 'good morning' into French and Spanish.",
    "Why is the sky blue?",
]

ROUTES = {"generate": "/v1/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class BenchResult:
    url: str
    route: str
    concurrency: int
    duration_s: float
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    req_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    batch_requests_mean: dict[str, float] = field(default_factory=dict)
    """Mean requests per model call, per model (Serve batching at work), from the answers' reports."""
    step_ms_mean: dict[str, float] = field(default_factory=dict)
    """Mean of each step's time as the ingress measured it (/v1/generate's timings_ms: generate,
    generate_model, score, score_model, total): where a request's latency goes."""
    calls_by_size: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    """Per model, per number of requests a call merged: how many such calls ran and the mean and
    largest time their model call took (ms), from the answers: which batch sizes make the tail."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of ``values``; nan when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def check_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address (the load generator is for local benchmarks)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url: expected http://HOST:PORT, got {url!r}")
    host = parts.hostname
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise ValueError(f"--url: cannot resolve {host!r}: {e}") from None
    bad = [a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if bad:
        raise ValueError(
            f"--url: {host} resolves to non-loopback {sorted(bad)}; the load generator only targets this machine"
        )


def make_body(route: str, instruction: str, k: int | None, max_new_tokens: int | None, extra: dict | None) -> dict:
    if route == "generate":
        body: dict[str, Any] = {"instruction": instruction, "k": k, "max_new_tokens": max_new_tokens}
    elif route == "completions":
        body = {"prompt": instruction, "n": k, "max_tokens": max_new_tokens}
    elif route == "chat":
        body = {"messages": [{"role": "user", "content": instruction}], "n": k, "max_tokens": max_new_tokens}
    else:
        raise ValueError(f"route: one of {sorted(ROUTES)}, got {route!r}")
    body.update(extra or {})
    return {key: v for key, v in body.items() if v is not None}


async def run_load(url: str, *, concurrency: int, duration_s: float, route: str = "generate", k: int | None = None,
                   max_new_tokens: int | None = None, api_key: str | None = None, instructions: list[str] | None = None,
                   extra: dict | None = None, timeout_s: float = 120.0) -> BenchResult:  # fmt: skip
    import httpx

    check_loopback(url)
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"--concurrency: must be in 1..{MAX_CONCURRENCY}, got {concurrency}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"--duration: must be in (0, {MAX_DURATION_S:.0f}] seconds, got {duration_s}")
    path = ROUTES[route]
    prompts = itertools.cycle(instructions or DEFAULT_INSTRUCTIONS)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    batch_sizes: dict[str, list[int]] = {}
    step_ms: dict[str, list[float]] = {}
    call_ms: dict[str, dict[int, list[float]]] = {}  # model -> requests in the call -> its answers' model ms
    sent = 0
    start = deadline = 0.0

    async def worker(client: "httpx.AsyncClient") -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            body = make_body(route, next(prompts), k, max_new_tokens, extra)
            sent += 1
            t0 = time.perf_counter()
            try:
                resp = await client.post(path, json=body)
            except httpx.TimeoutException:
                errors["timeout"] += 1
                continue
            except httpx.HTTPError as e:
                errors[type(e).__name__] += 1
                await asyncio.sleep(0.05)  # a refused connection must not spin the loop
                continue
            if resp.status_code == 200:
                latencies.append((time.perf_counter() - t0) * 1000.0)
                body = _body(resp)
                for who, n in _batch_sizes(body).items():
                    batch_sizes.setdefault(who, []).append(n)
                timings = body.get("timings_ms") or {}
                for step, ms in timings.items():
                    step_ms.setdefault(step, []).append(float(ms))
                for who, n in _batch_sizes(body).items():
                    ms = timings.get(_MODEL_STEP.get(who, ""))
                    if isinstance(ms, (int, float)):
                        call_ms.setdefault(who, {}).setdefault(n, []).append(float(ms))
            else:
                errors[f"http_{resp.status_code}"] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, limits=limits) as client:
        # the clock starts once the client exists (building its SSL context can take a second)
        start = time.perf_counter()
        deadline = start + duration_s
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return BenchResult(
        url=url,
        route=route,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=sent,
        ok=len(latencies),
        errors=dict(errors),
        req_per_s=len(latencies) / elapsed if elapsed > 0 else 0.0,
        latency_ms={
            "mean": sum(latencies) / len(latencies) if latencies else math.nan,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "max": max(latencies) if latencies else math.nan,
        },
        # a call of n requests is reported by its n answers: each weighs 1/n, so the sum counts calls
        batch_requests_mean={who: len(ns) / sum(1 / n for n in ns) for who, ns in sorted(batch_sizes.items())},
        step_ms_mean={step: round(sum(ms) / len(ms), 1) for step, ms in step_ms.items()},
        calls_by_size={who: {n: {"calls": round(len(ms) / n, 1), "model_ms_mean": round(sum(ms) / len(ms), 1),
                                 "model_ms_max": round(max(ms), 1)} for n, ms in sorted(sizes.items())}
                       for who, sizes in sorted(call_ms.items())},  # fmt: skip
    )


def _body(resp: Any) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


#: The timings_ms step that is a model's own call (every answer of a call reports the same time).
_MODEL_STEP = {"generator": "generate_model", "reranker": "score_model"}


def _batch_sizes(body: dict) -> dict[str, int]:
    """{model: requests in the call that served this one}: /v1/generate's "batch", or the OpenAI routes'
    "duetto" extension; {} for any other answer."""
    ext = body.get("duetto")
    batch = body.get("batch") or (ext.get("batch") if isinstance(ext, dict) else None)
    return {str(k): v for k, v in batch.items() if isinstance(v, int) and v > 0} if isinstance(batch, dict) else {}


def format_result(r: BenchResult) -> str:
    lat = r.latency_ms
    errs = ", ".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "none"
    return (
        f"{r.route} x{r.concurrency} for {r.duration_s:.1f}s: {r.requests} sent, {r.ok} ok, errors: {errs}\n"
        f"  throughput {r.req_per_s:.2f} req/s\n"
        f"  latency ms  p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  "
        f"mean {lat['mean']:.1f}  max {lat['max']:.1f}"
    ) + "".join(f"\n  {who}: {n:.1f} requests per model call (mean)" for who, n in r.batch_requests_mean.items())


def bench_main(args: Any) -> int:
    """`duetto serve bench`: args from serve/cli.py."""
    import os
    import sys

    extra = json.loads(args.extra) if args.extra else None
    if extra is not None and not isinstance(extra, dict):
        print("duetto serve bench: --extra must be a JSON object", file=sys.stderr)
        return 2
    api_key = args.api_key if args.api_key is not None else os.environ.get("DUETTO_API_KEY", "")
    try:
        result = asyncio.run(run_load(
            args.url, concurrency=args.concurrency, duration_s=args.duration, route=args.route, k=args.k,
            max_new_tokens=args.max_new_tokens, api_key=api_key or None, extra=extra, timeout_s=args.timeout,
        ))  # fmt: skip
    except ValueError as e:
        print(f"duetto serve bench: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"  wrote {args.json_out}")
    return 0 if not result.errors else 1
