"""The real commands in subprocesses: `duetto serve` + `duetto query` + `duetto serve bench`, and
`serve run` of a Serve config file shaped like configs/serve_app.yaml. Each starts its own Ray."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU_SHARES = ["--set", "generator_deployment.num_cpus=0.5", "--set", "reranker_deployment.num_cpus=0.5",
              "--set", "ingress_deployment.num_cpus=0.25"]  # fmt: skip


def _env(**extra: str) -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _lines(proc: subprocess.Popen) -> "queue.Queue[str]":
    q: queue.Queue[str] = queue.Queue()

    def pump(stream):
        for line in stream:
            q.put(line)

    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=pump, args=(stream,), daemon=True).start()
    return q


def _wait_for(q: "queue.Queue[str]", proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            line = q.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen (rc={proc.poll()}):\n{''.join(seen[-40:])}")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def test_duetto_serve_query_and_bench(qlora_trial, galore_trial):
    from duetto.serve.app import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = _env(DUETTO_API_KEY="cli-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "duetto", "serve", "--generator", str(qlora_trial), "--reranker", str(galore_trial),
         "--k", "2", "--max-new-tokens", "4", "--port", str(port), *CPU_SHARES],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        seen = _wait_for(_lines(proc), proc, "ready at", timeout=600)
        assert f"ready at {url}" in seen[-1]
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # the env key is enforced
        q = subprocess.run([sys.executable, "-m", "duetto", "query", "Name a color.", "--url", url, "--candidates"],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert q.returncode == 0, q.stderr
        assert q.stdout.count("gen=") == 2 and "timings_ms" in q.stdout
        b = subprocess.run([sys.executable, "-m", "duetto", "serve", "bench", "--url", url, "--concurrency", "2",
                            "--duration", "3"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert b.returncode == 0, b.stdout + b.stderr
        assert "errors: none" in b.stdout and "req/s" in b.stdout and "p99" in b.stdout
    finally:
        rc = _stop(proc)
    assert rc == 0


def test_serve_run_config_file(qlora_trial, galore_trial, tmp_path):
    """configs/serve_app.yaml with CPU shares and this test's models and port, through `serve run`."""
    from duetto.serve.app import free_port

    data = yaml.safe_load((CONFIGS / "serve_app.yaml").read_text())
    port = free_port()
    data["http_options"]["port"] = port
    args = data["applications"][0]["args"]
    args.pop("from_sweep")
    args.update(generator=str(qlora_trial), reranker=str(galore_trial))
    for name in ("generator_deployment", "reranker_deployment"):
        args[name].update(num_gpus=0, num_cpus=0.5)
    args["ingress_deployment"] = {"num_cpus": 0.25}
    config = tmp_path / "serve_app.yaml"
    config.write_text(yaml.safe_dump(data))
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_bin), "run", "--address", "local", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)  # fmt: skip
    lines = _lines(proc)
    try:
        deadline, status = time.time() + 600, None
        while time.time() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(2)
        tail = []
        while not lines.empty():
            tail.append(lines.get())
        assert status == 200, "".join(tail[-40:])
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/generate", json={"instruction": "hi", "k": 2, "max_new_tokens": 3}, timeout=120
        )
        assert r.status_code == 200 and len(r.json()["candidates"]) == 2
    finally:
        _stop(proc)
