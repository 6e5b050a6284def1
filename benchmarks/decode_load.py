"""The generator's decoding under concurrent clients, one process, one GPU, no Serve: merged static batches
(decoded by ``generate`` or by whole compiled steps) against transformers' continuous batching, as
latency a client sees.

``decode_paths.py`` times one call of a fixed size; this script asks what a request waits for when
others keep arriving. On the random SmolLM2-135M QLoRA trial of `serve_bench.py` (adapter merged
into bf16 weights, as Serve loads it), --clients closed-loop clients each send one request at a time
(k samples x --new-tokens tokens, temperature 0.8, top-p 0.95) for --seconds per level:

- batched: what the Serve generator runs: one model thread takes every request queued since its last
  call or within --batch-wait of its first (up to --max-batch requests, Serve's max_batch_size) into
  one ``generate_candidates`` call on static shapes (``StaticDecoding``, every bucket compiled
  first); a request that arrives while a call decodes waits for that call to end;
- steps: the same batches decoded by whole compiled steps (trainers/decode_steps.py: forward,
  sampling and stop checks in one CUDA graph) instead of ``generate``;
- continuous: transformers' ``ContinuousBatchingManager`` (paged KV cache, its own CUDA graphs):
  each request's k rows join the running batch at the next decoding step and leave when they end.

Prints p50 / p99 latency and requests/s per path and client count; writes --out as JSON.

    python benchmarks/decode_load.py --smollm2-dir DIR --out benchmarks/results/decode_load_h100.json
    # CPU smoke run (a minute on 2 cores):
    python benchmarks/decode_load.py --smollm2-dir DIR --clients 1,2 --seconds 3 --new-tokens 8 --out /tmp/decode_load.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import queue
import statistics
import threading
import time
import traceback
from pathlib import Path



def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def closed_loop(submit, clients: int, seconds: float) -> dict:
    """``clients`` threads each calling ``submit(i)`` (blocking, one request) back to back for ``seconds``."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(c: int) -> None:
        i = 0
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                submit(c * 100_000 + i)
            except Exception as e:  # noqa: BLE001 - counted, the run goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            finally:
                i += 1
            with lock:
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    row = {"clients": clients, "requests": len(latencies), "req_s": len(latencies) / wall, "errors": len(errors),
           "first_errors": errors[:3]}  # fmt: skip
    if latencies:
        row.update(p50_ms=1000 * percentile(latencies, 50), p95_ms=1000 * percentile(latencies, 95),
                   p99_ms=1000 * percentile(latencies, 99), mean_ms=1000 * statistics.fmean(latencies))  # fmt: skip
    return row


class Batched:
    """Serve's generator without Serve: one model thread, each call takes every request queued
    by --batch-wait seconds after the first (Serve's batch_wait_timeout_s)."""

    def __init__(self, sample, max_batch: int, wait_s: float):
        self.sample, self.max_batch, self.wait_s = sample, max_batch, wait_s
        self.inbox: queue.Queue = queue.Queue()
        self.calls: list[int] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            batch = [self.inbox.get()]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.inbox.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            self.calls.append(len(batch))
            try:
                out = self.sample([prompt for prompt, _ in batch])
                for (_, done), cands in zip(batch, out):
                    done.put(cands)
            except Exception as e:  # noqa: BLE001 - every waiting client sees it
                for _, done in batch:
                    done.put(e)

    def submit(self, prompt: str):
        done: queue.Queue = queue.Queue(maxsize=1)
        self.inbox.put((prompt, done))
        out = done.get()
        if isinstance(out, Exception):
            raise out
        return out


class Continuous:
    """transformers' continuous batching: k rows per request (``num_return_sequences``), routed back by id."""

    def __init__(self, manager, k: int):
        self.manager, self.k = manager, k
        self.waiting: dict[str, tuple[list, threading.Event]] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._route, daemon=True).start()

    def _route(self) -> None:
        while True:
            out = self.manager.get_result(timeout=0.05)
            if out is None or not out.is_finished():
                continue
            base = out.request_id.split("__child#")[0]
            with self.lock:
                got, event = self.waiting[base]
                got.append(out)
                if len(got) == self.k:
                    event.set()

    def submit(self, rid: str, input_ids: list[int]):
        event = threading.Event()
        with self.lock:
            self.waiting[rid] = ([], event)
        self.manager.add_request(input_ids=input_ids, request_id=rid)
        if not event.wait(timeout=120):
            raise TimeoutError(f"request {rid}: no answer in 120 s")
        with self.lock:
            got, _ = self.waiting.pop(rid)
        errors = [o.error for o in got if o.error]
        if errors:
            raise RuntimeError(errors[0])
        return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-dir", required=True)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-batch", type=int, default=32, help="Serve's generator max_batch_size")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="Serve's batch_wait_timeout_s")
    ap.add_argument("--row-buckets", default="4,16,64,128", help="the static path's row buckets (Serve's default)")
    ap.add_argument("--paths", default="steps,batched,continuous")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from serve_bench import merged_generator  # benchmarks/ is on sys.path when this runs
    from transformers import GenerationConfig

    from duetto.trainers.inference import StaticDecoding, generate_candidates

    clients = [int(c) for c in args.clients.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"machine": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "date": datetime.date.today().isoformat(),
                    "settings": vars(args), "rows": []}  # fmt: skip
    lm, prompts = merged_generator(args.smollm2_dir, device)

    def record(path: str, fn, n: int, extra=None) -> None:
        row = {"path": path}
        try:
            row.update(closed_loop(fn, n, args.seconds))
            row.update(extra() if extra else {})
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            row.update(clients=n, error=f"{type(e).__name__}: {e}"[-800:], traceback=traceback.format_exc()[-2500:])
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    paths = args.paths.split(",")
    for path in [p for p in ("steps", "batched") if p in paths]:
        whole = path == "steps"
        static = StaticDecoding([int(r) for r in args.row_buckets.split(",")], [256], whole_steps=whole) if device == "cuda" else None
        t = time.perf_counter()
        try:
            result[f"{path}_warm_up"] = static.warm_up(lm.model, lm.tokenizer, lm.stop_ids) if static else {}
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            result[f"{path}_error"] = f"{type(e).__name__}: {e}"[-800:]
            result[f"{path}_traceback"] = traceback.format_exc()[-2500:]
            print(result[f"{path}_error"], flush=True)
            continue
        result[f"{path}_warm_up_s"] = round(time.perf_counter() - t, 1)

        def sample(batch: list[str], static=static):
            return generate_candidates(lm.model, lm.tokenizer, batch, args.k, max_new_tokens=args.new_tokens,
                                       temperature=0.8, top_p=0.95, stop_ids=lm.stop_ids,
                                       max_prompt_tokens=lm.max_seq_len, static=static)  # fmt: skip

        server = Batched(sample, args.max_batch, args.batch_wait)
        server.submit(prompts[0])
        for n in clients:
            server.calls.clear()

            def calls_summary():
                return {"requests_per_call": statistics.fmean(server.calls) if server.calls else None}

            record(path, lambda i: server.submit(prompts[i % len(prompts)]), n, calls_summary)
    if "continuous" in paths:
        from transformers import ContinuousBatchingConfig

        cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                               num_return_sequences=args.k, eos_token_id=lm.stop_ids,
                               pad_token_id=lm.tokenizer.pad_token_id)  # fmt: skip
        t = time.perf_counter()
        try:
            manager = lm.model.init_continuous_batching(
                generation_config=cfg, continuous_batching_config=ContinuousBatchingConfig(return_logprobs=True))
            manager.start()
            server = Continuous(manager, args.k)
            ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            for j in range(3):  # first calls: graph capture and allocation
                server.submit(f"warm-{j}", ids[j])
            result["continuous_warm_up_s"] = round(time.perf_counter() - t, 1)
            for n in clients:
                record("continuous", lambda i: server.submit(f"r{n}-{i}", ids[i % len(ids)]), n)
            manager.stop(block=True, timeout=30)
        except Exception as e:  # noqa: BLE001
            result["continuous_error"] = f"{type(e).__name__}: {e}"[-800:]
            result["continuous_traceback"] = traceback.format_exc()[-2500:]
            print(result["continuous_error"], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"\n{'path':<12}{'clients':>8}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'req/call':>9}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['path']:<12}{r['clients']:>8}  ERROR {r['error'][:90]}")
        else:
            per = r.get("requests_per_call")
            print(f"{r['path']:<12}{r['clients']:>8}{r['req_s']:>8.1f}{r.get('p50_ms', 0):>9.0f}{r.get('p99_ms', 0):>9.0f}"
                  f"{per if per is None else round(per, 1)!s:>9}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
