"""Serve benchmark: the batched Ray Serve ensemble against the naive pipeline, same models, same k.

    # H200 (random-weight gemma-3-1b-it architecture for both models, k=4, 64 new tokens):
    python benchmarks/serve_bench.py --out benchmarks/serve_bench_h200.json
    # trained models instead:
    python benchmarks/serve_bench.py --generator runs/qlora/trial --reranker runs/galore/trial
    # CPU smoke test on tiny models (a minute or two on 2 cores):
    python benchmarks/serve_bench.py --tiny --out /tmp/serve_bench_tiny.json

Naive pipeline = what one would write without Serve: per request, HF generate k samples, then one
scoring pass of the k candidates with the reranker, then the next request (no cross-request
batching, one process holding both models). Serve = the app of `duetto serve` (both models sharing
the GPU, 0.5 each, @serve.batch in both), driven by the closed-loop load generator of
`duetto serve bench` at several concurrencies. The script prints a table and writes every number
(plus the machine and settings) as JSON.

Without --generator/--reranker the models are two random-weight initialisations (seeds 0 and 1) of
the gemma-3-1b-it architecture. Their tokenizer is --tokenizer DIR (e.g. a Gemma 3
tokenizer folder) or, by default, the tiny offline Gemma-style BPE of `duetto model tiny`; ids
beyond that tokenizer's vocabulary are suppressed during sampling so every candidate decodes to text
(the 262k-row LM head is still computed at full size, so the cost is the real architecture's).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Summarize the plot of Romeo and Juliet.",
    "Name three colors of the rainbow.",
    "How do I make a cup of tea?",
    "Why is exercise important?",
]

GEMMA3_1B = dict(  # google/gemma-3-1b-it's architecture
    vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256, tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=32768,
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
)  # fmt: skip


def _log(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_random_gemma(out: Path, tokenizer_dir: str | None, seed: int, device: str) -> Path:
    """Save a random-weight gemma-3-1b-it-shaped model (bf16) with a tokenizer into ``out``."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    from duetto.tiny_model import build_tiny
    from duetto.tokens import stop_token_ids

    if tokenizer_dir:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tok = AutoTokenizer.from_pretrained(build_tiny(out.parent / f"tok-{seed}", style="gemma"))
    from duetto.tokens import ensure_pad_token

    ensure_pad_token(tok)
    cfg = Gemma3TextConfig(
        **GEMMA3_1B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id
    )
    if len(tok) < cfg.vocab_size:
        # a random model samples any of the 262k ids; keep to ids the tokenizer can turn into text
        gen.suppress_tokens = list(range(len(tok), cfg.vocab_size))
    model.generation_config = gen
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def build_models(args, work: Path) -> tuple[str, str]:
    if args.generator and args.reranker:
        return args.generator, args.reranker
    if args.generator or args.reranker:
        raise SystemExit("give both --generator and --reranker, or neither")
    from duetto.tiny_model import build_tiny

    if args.tiny:
        return str(build_tiny(work / "gen", "gemma", seed=0)), str(build_tiny(work / "rer", "smollm", seed=1))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    gen = build_random_gemma(work / "gen", args.tokenizer, 0, device)
    rer = build_random_gemma(work / "rer", args.tokenizer, 1, device)
    _log(f"built two random gemma-3-1b-it models in {time.perf_counter() - t0:.0f} s")
    return str(gen), str(rer)


def _percentiles(xs: list[float]) -> dict:
    from duetto.serve.bench import percentile

    return {
        "mean": sum(xs) / len(xs),
        "p50": percentile(xs, 50),
        "p95": percentile(xs, 95),
        "p99": percentile(xs, 99),
        "max": max(xs),
    }


def run_naive(gen_src: str, rer_src: str, args) -> dict:
    """Per request: generate k, score k, choose; strictly one request at a time."""
    import torch

    from duetto.serve.ensemble import EnsembleRequest, ensemble_generate
    from duetto.trainers.inference import generate_candidates, prompt_text
    from duetto.serve.loading import load_lm

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    gen, rer = load_lm(gen_src, device=device), load_lm(rer_src, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    reqs = [EnsembleRequest(PROMPTS[i % len(PROMPTS)], k=args.k, max_new_tokens=args.max_new_tokens,
                            temperature=0.8, top_p=0.95) for i in range(args.naive_requests)]  # fmt: skip
    for r in reqs[: args.warmup]:
        ensemble_generate(gen, rer, [r])
    sync()
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for r in reqs:
        t = time.perf_counter()
        (res,) = ensemble_generate(gen, rer, [r])
        sync()
        latencies.append((time.perf_counter() - t) * 1000.0)
        tokens += sum(c.tokens for c in res.candidates)
    elapsed = time.perf_counter() - t0
    # the hardware reference: plain HF generate, 8 prompts x k samples x N tokens, one call
    prompts = [prompt_text(gen.tokenizer, gen.template, p) for p in PROMPTS]
    # Called twice and the second kept: a first call at a batch size new to the process costs ~3 s more on
    # an H200 (benchmarks/results/generate_diag_h200_c.json).
    plain = []
    for _ in range(2):
        sync()
        t = time.perf_counter()
        out = generate_candidates(gen.model, gen.tokenizer, prompts, args.k, max_new_tokens=args.max_new_tokens,
                                  temperature=0.8, top_p=0.95, stop_ids=gen.stop_ids)  # fmt: skip
        sync()
        plain.append(time.perf_counter() - t)
    plain_s = plain[1]
    result = {
        "requests": len(reqs),
        "req_per_s": len(reqs) / elapsed,
        "latency_ms": _percentiles(latencies),
        "generated_tokens_per_s": tokens / elapsed,
        "plain_generate_8xk_s": plain_s,
        "plain_generate_8xk_first_call_s": plain[0],
        "plain_generate_8xk_tokens": sum(c.tokens for cs in out for c in cs),
        "device": device,
    }
    del gen, rer
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_serve(gen_src: str, rer_src: str, args) -> dict:
    import ray
    import torch
    from ray import serve

    from duetto.config import from_dict
    from duetto.serve.app import start
    from duetto.serve.bench import run_load
    from duetto.serve.config import ServeConfig

    gpu = torch.cuda.is_available() and not args.tiny
    share = {"num_gpus": 0.5, "num_cpus": 1} if gpu else {"num_cpus": 0.5}
    batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait,
                "max_ongoing_requests": max(2 * args.max_batch_size, max(args.concurrency)),
                "max_queued_requests": 4 * max(args.concurrency)}  # fmt: skip
    cfg = from_dict(ServeConfig, {
        "generator": gen_src, "reranker": rer_src, "port": _free_port(),
        "ensemble": {"k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": 0.8, "top_p": 0.95},
        "limits": {"max_new_tokens": max(512, args.max_new_tokens)},
        "generator_deployment": {**share, **batching}, "reranker_deployment": {**share, **batching},
        "ingress_deployment": {"num_cpus": 0.25 if args.tiny else 1},
    })  # fmt: skip
    from duetto.ray_connect import init_local

    init_local(include_dashboard=False, **({"num_cpus": 2} if args.tiny else {}))
    runs = []
    try:
        t0 = time.perf_counter()
        url = start(cfg)
        load_s = time.perf_counter() - t0
        _log(f"Serve app up at {url} in {load_s:.0f} s")
        # warm-up: CUDA kernels, allocator, the batch queues
        asyncio.run(run_load(url, concurrency=max(1, min(4, max(args.concurrency))), duration_s=args.warmup_s))
        for c in args.concurrency:
            r = asyncio.run(run_load(url, concurrency=c, duration_s=args.duration, k=args.k, max_new_tokens=args.max_new_tokens,
                                     timeout_s=600))  # fmt: skip
            _log(f"serve c={c}: {r.req_per_s:.2f} req/s, p50 {r.latency_ms['p50']:.0f} ms, errors {r.errors}, "
                 f"requests per model call {r.batch_requests_mean}")
            runs.append(r.to_dict())
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"startup_s": load_s, "runs": runs, "deployment": {**share, **batching}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", help="trial dir / model dir / HF model (default: random gemma-3-1b-it)")
    p.add_argument("--reranker", help="trial dir / model dir / HF model (default: random gemma-3-1b-it, another seed)")
    p.add_argument(
        "--tokenizer", help="tokenizer dir for the random models (default: the tiny offline Gemma-style BPE)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: tiny models, k=2, 8 tokens, a few seconds of load"
    )
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,16,32", help="comma-separated closed-loop client counts")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per concurrency")
    p.add_argument("--naive-requests", type=int, default=16, help="requests timed through the naive pipeline")
    p.add_argument("--warmup", type=int, default=2, help="naive warm-up requests")
    p.add_argument("--warmup-s", type=float, default=10.0, help="seconds of Serve warm-up load")
    p.add_argument("--max-batch-size", type=int, default=16, help="@serve.batch max_batch_size of both models")
    p.add_argument("--batch-wait", type=float, default=0.02, help="@serve.batch batch_wait_timeout_s")
    p.add_argument("--out", default="benchmarks/serve_bench.json", help="JSON result path")
    args = p.parse_args(argv)
    if args.tiny:
        args.k, args.max_new_tokens = min(args.k, 2), min(args.max_new_tokens, 8)
        args.concurrency = args.concurrency if args.concurrency != "1,8,16,32" else "1,2"
        args.duration, args.naive_requests, args.warmup, args.warmup_s = (
            min(args.duration, 4.0),
            min(args.naive_requests, 3),
            1,
            2.0,
        )
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]

    import torch
    import transformers
    import ray

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "ray": ray.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        # launch-bound decoding slows down when other jobs load the CPUs: keep the load beside the figures
        "loadavg_1min_start": os.getloadavg()[0],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        gen_src, rer_src = build_models(args, Path(tmp))
        _log(f"naive pipeline: {args.naive_requests} requests, k={args.k}, {args.max_new_tokens} new tokens")
        naive = run_naive(gen_src, rer_src, args)
        _log(f"naive: {naive['req_per_s']:.2f} req/s, p50 {naive['latency_ms']['p50']:.0f} ms")
        served = run_serve(gen_src, rer_src, args)
    env["loadavg_1min_end"] = os.getloadavg()[0]
    result = {
        "settings": {"k": args.k, "max_new_tokens": args.max_new_tokens, "models": "tiny" if args.tiny else
                     ("given" if args.generator else "random gemma-3-1b-it x2"), "generator": args.generator,
                     "reranker": args.reranker, "tokenizer": args.tokenizer or "tiny offline BPE (1024 ids)"},
        "environment": env,
        "naive": naive,
        "serve": served,
    }  # fmt: skip
    rows = [("naive (sequential)", 1, naive["req_per_s"], naive["latency_ms"], {})]
    rows += [("serve", r["concurrency"], r["req_per_s"], r["latency_ms"], r["errors"]) for r in served["runs"]]
    print(f"\nk={args.k}, {args.max_new_tokens} new tokens, {result['settings']['models']}, {env['gpu'] or 'CPU'}")
    print(f"{'pipeline':<20}{'conc':>5}{'req/s':>9}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}  errors")
    for name, c, rps, lat, errs in rows:
        print(
            f"{name:<20}{c:>5}{rps:>9.2f}{lat['p50']:>10.0f}{lat['p95']:>10.0f}{lat['p99']:>10.0f}  {sum(errs.values())}"
        )
    print(
        f"plain HF generate, 8 prompts x {args.k} samples x {args.max_new_tokens} tokens: "
        f"{naive['plain_generate_8xk_s']:.2f} s (first call at that size: {naive['plain_generate_8xk_first_call_s']:.2f} s)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    errors = sum(sum(r["errors"].values()) for r in served["runs"])
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
