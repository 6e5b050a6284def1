"""The load generator's counting and statistics, against a small real HTTP server with known answers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from duetto.serve.bench import check_loopback, make_body, percentile, run_load


def test_percentile_interpolates():
    xs = [float(x) for x in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) != percentile([], 50)  # nan


def test_loopback_only():
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000/")
    check_loopback("http://[::1]:8000")
    for url in ("http://10.0.0.1:8000", "http://192.0.2.7", "ftp://127.0.0.1", "127.0.0.1:8000"):
        with pytest.raises(ValueError):
            check_loopback(url)


def test_bodies_per_route():
    assert make_body("generate", "hi", 4, 64, None) == {"instruction": "hi", "k": 4, "max_new_tokens": 64}
    assert make_body("completions", "hi", 2, None, {"seed": 1}) == {"prompt": "hi", "n": 2, "seed": 1}
    assert make_body("chat", "hi", None, 8, None) == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class _Server(BaseHTTPRequestHandler):
    """Every third request gets 503 after 20 ms; the others 200 after 20 ms."""

    count = 0
    lock = threading.Lock()
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with _Server.lock:
            _Server.count += 1
            n = _Server.count
            _Server.bodies.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        time.sleep(0.02)
        code = 503 if n % 3 == 0 else 200
        # what the app reports: how many requests the model call that served this one held
        # and how long that call took (generator calls of 2 requests: 30 ms, of 1: 10 ms)
        out = json.dumps({"batch": {"generator": 1 + n % 2, "reranker": 4},
                          "timings_ms": {"generate_model": 10 + 20 * (n % 2), "score_model": 5}}
                         if code == 200 else {}).encode()  # fmt: skip
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_run_load_counts_ok_errors_and_latency():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = asyncio.run(run_load(url, concurrency=3, duration_s=1.0, k=2, max_new_tokens=4, api_key="tok"))
    finally:
        server.shutdown()
        server.server_close()
    assert r.requests == _Server.count and r.requests >= 9
    assert r.errors == {"http_503": r.requests // 3}
    assert r.ok == r.requests - r.requests // 3
    assert 15 <= r.latency_ms["p50"] <= r.latency_ms["p95"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
    assert r.req_per_s == pytest.approx(r.ok / r.duration_s, rel=1e-3)  # duration_s is rounded to ms
    assert 1.0 <= r.duration_s < 3.0  # in-flight requests finish after the deadline, bounded
    assert r.batch_requests_mean["reranker"] == 4.0
    # answers alternate between calls of 1 and of 2 requests: 2 answers per call of 2, so per call
    # the mean is below the answers' plain average (1.5)
    assert 1.0 < r.batch_requests_mean["generator"] < 1.5
    # per call size: each answer of a call of n counts 1/n call; the times are the calls' own
    gen = r.calls_by_size["generator"]
    assert set(gen) == {1, 2} and gen[2]["model_ms_mean"] == gen[2]["model_ms_max"] == 30.0
    assert gen[1]["model_ms_mean"] == 10.0 and gen[1]["calls"] == pytest.approx(2 * gen[2]["calls"], abs=1.0)
    assert r.calls_by_size["reranker"] == {4: {"calls": pytest.approx(r.ok / 4, abs=0.1), "model_ms_mean": 5.0,
                                               "model_ms_max": 5.0}}  # fmt: skip
    first = _Server.bodies[0]
    assert first["path"] == "/v1/generate" and first["auth"] == "Bearer tok" and first["k"] == 2


def test_run_load_counts_refused_connections():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = asyncio.run(run_load(f"http://127.0.0.1:{port}", concurrency=1, duration_s=0.3))
    assert r.ok == 0 and sum(r.errors.values()) == r.requests >= 1
