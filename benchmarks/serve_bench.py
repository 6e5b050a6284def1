"""Serve benchmark: the batched Ray Serve ensemble against the naive pipeline, same models, same k.

    # GPU, SmolLM2-135M's architecture (config + tokenizer folder), then gemma-3-1b-it's, into one file:
    python benchmarks/serve_bench.py --model smollm2 --smollm2-dir DIR --out benchmarks/results/serve_speed_h200.json
    python benchmarks/serve_bench.py --model gemma1b --append --out benchmarks/results/serve_speed_h200.json
    # trained models instead:
    python benchmarks/serve_bench.py --generator runs/qlora/trial --reranker runs/galore/trial
    # CPU smoke test on tiny models (a minute or two on 2 cores):
    python benchmarks/serve_bench.py --tiny --out /tmp/serve_bench_tiny.json

Naive pipeline = what one would write without Serve: per request, HF generate k samples (the QLoRA
adapter on its quantized base, dynamic cache), then one scoring pass of the k candidates with the
reranker, then the next request (no cross-request batching, one process holding both models); its
req/s is the same whatever the number of clients. Serve = the app of `duetto serve` with its
defaults (both models sharing the GPU, 0.5 each; the adapter merged; static-shape decoding warmed up
before the replicas report ready; @serve.batch with parked-batch merging), driven by the closed-loop
load generator of `duetto serve bench` at several concurrencies. The script prints a table and
writes one row per pipeline x clients (plus the machine and settings) as JSON.

Without --generator/--reranker the models are random-weight trials of the chosen architecture: the
generator a QLoRA trial (a random LoRA r4 adapter on q/k/v/o_proj, trained at 4 bits), the reranker
a GaLore trial (a full model of another seed). SmolLM2's come from --smollm2-dir (its config and
tokenizer); gemma-3-1b-it's use the tiny offline Gemma-style BPE of `duetto model tiny` (or
--tokenizer DIR), and ids beyond that tokenizer's vocabulary are suppressed during sampling so every
candidate decodes to text (the 262k-row LM head is still computed at full size).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
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


def build_random_smollm2(out: Path, config_dir: str, seed: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_models import smollm2_random

    return smollm2_random(config_dir, out, seed)


def merged_generator(config_dir: str, device: str):
    """The generator of the random SmolLM2 QLoRA trial below, loaded as Serve loads it on a GPU (adapter
    merged into bf16 weights), and PROMPTS in its template: what the decoding benchmarks decode."""
    import tempfile

    from duetto.serve.loading import load_lm
    from duetto.trainers.inference import prompt_text

    work = Path(tempfile.mkdtemp(prefix="generator-"))
    gen = build_random_smollm2(work / "gen", config_dir, 0)
    rer = build_random_smollm2(work / "rer", config_dir, 1)
    gen_trial, _ = as_trials(work, gen, rer, "study")
    lm = load_lm(gen_trial, device=device, adapter="merge")
    return lm, [prompt_text(lm.tokenizer, lm.template, q) for q in PROMPTS]


def as_trials(work: Path, gen_base: Path, rer_model: Path, template: str) -> tuple[str, str]:
    """A QLoRA trial dir (a random LoRA r4 adapter over ``gen_base``, trained at 4 bits) and a GaLore
    trial dir (``rer_model`` as its full model), laid out as `duetto train` saves them."""
    import shutil

    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gen, rer = work / "qlora-trial", work / "galore-trial"
    base = AutoModelForCausalLM.from_pretrained(gen_base, dtype=torch.bfloat16)
    torch.manual_seed(2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)  # fmt: skip
    get_peft_model(base, lora).save_pretrained(gen / "model")
    AutoTokenizer.from_pretrained(gen_base).save_pretrained(gen / "model")
    shutil.copytree(rer_model, rer / "model")
    for trial, method, model, extra in ((gen, "qlora", gen_base, {"qlora": {"bits": 4}}), (rer, "galore", rer_model, {})):
        cfg = {"method": method, "model": str(model), "template": template, "max_seq_len": 128, **extra}
        (trial / "config.yaml").write_text(yaml.safe_dump(cfg))
    return str(gen), str(rer)


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
    if args.model == "smollm2":
        if not args.smollm2_dir:
            raise SystemExit("--model smollm2 needs --smollm2-dir (SmolLM2-135M's config and tokenizer files)")
        gen = build_random_smollm2(work / "gen", args.smollm2_dir, 0)
        rer = build_random_smollm2(work / "rer", args.smollm2_dir, 1)
    else:
        gen = build_random_gemma(work / "gen", args.tokenizer, 0, device)
        rer = build_random_gemma(work / "rer", args.tokenizer, 1, device)
    _log(f"built two random {args.model} models in {time.perf_counter() - t0:.0f} s")
    return as_trials(work, gen, rer, "study")


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
    # as a user would load them without Serve: the adapter on the base it trained on, dynamic cache
    gen, rer = load_lm(gen_src, device=device, adapter="keep"), load_lm(rer_src, device=device)

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
    from duetto.serve.app import free_port, start
    from duetto.serve.bench import run_load
    from duetto.serve.config import ServeConfig

    gpu = torch.cuda.is_available() and not args.tiny
    share = {"num_gpus": 0.5, "num_cpus": 1} if gpu else {"num_cpus": 0.5}
    batching = {}  # the shipped defaults, unless the command line says otherwise
    if args.max_batch_size:
        batching["max_batch_size"] = args.max_batch_size
    if args.batch_wait is not None:
        batching["batch_wait_timeout_s"] = args.batch_wait
    from duetto.config import apply_overrides

    cfg = from_dict(ServeConfig, apply_overrides({
        "generator": gen_src, "reranker": rer_src, "port": free_port(),
        "ensemble": {"k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": 0.8, "top_p": 0.95},
        "limits": {"max_new_tokens": max(512, args.max_new_tokens)},
        "generator_deployment": {**share, **batching}, "reranker_deployment": {**share, **batching},
        "colocate": "on" if args.colocate else "off",
        "ingress_deployment": {"num_cpus": 0.25 if args.tiny else 1},
        **({"decoding": {"row_buckets": [2, 8], "length_buckets": [64]}} if args.tiny else {}),
    }, args.set))  # fmt: skip
    from duetto.ray_connect import init_local

    init_local(include_dashboard=False, **({"num_cpus": 2} if args.tiny else {}))
    runs = []
    try:
        t0 = time.perf_counter()
        url = start(cfg)
        load_s = time.perf_counter() - t0
        _log(f"Serve app up at {url} in {load_s:.0f} s")
        info = _get_json(url + "/v1/info")
        # warm-up: CUDA kernels, allocator, the batch queues
        asyncio.run(run_load(url, concurrency=max(1, min(4, max(args.concurrency))), duration_s=args.warmup_s))
        for c in args.concurrency:
            r = asyncio.run(run_load(url, concurrency=c, duration_s=args.duration, k=args.k, max_new_tokens=args.max_new_tokens,
                                     timeout_s=600))  # fmt: skip
            _log(f"serve c={c}: {r.req_per_s:.2f} req/s, p50 {r.latency_ms['p50']:.0f} ms, errors {r.errors}, "
                 f"requests per model call {r.batch_requests_mean}, mean step ms {r.step_ms_mean}")
            runs.append(r.to_dict())
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"startup_s": load_s, "runs": runs, "deployment": {**share, **batching}, "overrides": args.set, "info": info}


def _get_json(url: str) -> dict:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())
    except Exception as e:  # the figures stand without it
        return {"error": str(e)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", help="trial dir / model dir / HF model (default: a random --model QLoRA trial)")
    p.add_argument("--reranker", help="trial dir / model dir / HF model (default: a random --model GaLore trial)")
    p.add_argument("--model", choices=["smollm2", "gemma1b"], default="gemma1b", help="architecture of the random trials")
    p.add_argument("--smollm2-dir", help="SmolLM2-135M config + tokenizer folder (for --model smollm2)")
    p.add_argument("--append", action="store_true", help="keep --out's rows of other models (same GPU only)")
    p.add_argument(
        "--tokenizer", help="tokenizer dir for the random models (default: the tiny offline Gemma-style BPE)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="CPU smoke test: tiny models, k=2, 8 tokens, a few seconds of load"
    )
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated closed-loop client counts")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per concurrency")
    p.add_argument("--naive-requests", type=int, default=16, help="requests timed through the naive pipeline")
    p.add_argument("--warmup", type=int, default=2, help="naive warm-up requests")
    p.add_argument("--warmup-s", type=float, default=10.0, help="seconds of Serve warm-up load")
    p.add_argument("--max-batch-size", type=int, default=0, help="@serve.batch max_batch_size of both models (0: default)")
    p.add_argument("--batch-wait", type=float, default=None, help="@serve.batch batch_wait_timeout_s (default: the config's)")
    p.add_argument("--colocate", action="store_true", help="both models in one replica (colocate: on)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a ServeConfig override for the Serve app, e.g. 'decoding.row_buckets=[4, 16, 32, 64, 128]'")
    p.add_argument("--out", default="benchmarks/serve_bench.json", help="JSON result path")
    args = p.parse_args(argv)
    if args.out == "benchmarks/serve_bench.json" and not args.tiny:
        args.out = "benchmarks/results/serve_speed.json"
    if args.tiny:
        args.k, args.max_new_tokens = min(args.k, 2), min(args.max_new_tokens, 8)
        args.concurrency = args.concurrency if args.concurrency != "1,8,32,64" else "1,2"
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
    model = "tiny" if args.tiny else ("given" if args.generator else args.model)
    details = {
        "settings": {"k": args.k, "max_new_tokens": args.max_new_tokens, "model": model, "generator": args.generator,
                     "reranker": args.reranker, "duration_s": args.duration, "colocate": args.colocate, "set": args.set},
        "environment": env,
        "naive": naive,
        "serve": served,
    }  # fmt: skip
    rows = [speed_row(model, "naive", 1, naive["requests"], naive["req_per_s"], naive["latency_ms"], {})]
    rows += [speed_row(model, "serve", r["concurrency"], r["requests"], r["req_per_s"], r["latency_ms"], r["errors"],
                       r.get("batch_requests_mean", {}), r.get("step_ms_mean", {})) for r in served["runs"]]  # fmt: skip
    naive_rps = naive["req_per_s"]
    print(f"\nk={args.k}, {args.max_new_tokens} new tokens, {model}, {env['gpu'] or 'CPU'}")
    print(f"{'pipeline':<10}{'clients':>8}{'req/s':>9}{'x naive':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'5xx':>6}{'503':>6}  requests per model call")  # fmt: skip
    for r in rows:
        print(f"{r['pipeline']:<10}{r['clients']:>8}{r['req_s']:>9.2f}{r['req_s'] / naive_rps:>9.1f}{r['p50_ms']:>9.0f}"
              f"{r['p95_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['errors_5xx']:>6}{r['errors_503']:>6}  "
              f"{r.get('requests_per_model_call', '')}")  # fmt: skip
    print(
        f"plain HF generate, 8 prompts x {args.k} samples x {args.max_new_tokens} tokens: "
        f"{naive['plain_generate_8xk_s']:.2f} s (first call at that size: {naive['plain_generate_8xk_first_call_s']:.2f} s)"
    )
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.append and out.exists() else {}
    if previous and previous.get("machine") != env["gpu"]:
        raise SystemExit(f"--append: {out} was measured on {previous.get('machine')}, this is {env['gpu']}")
    kept = [r for r in previous.get("rows", []) if r["model"] != model]
    details_all = {**previous.get("details", {}), model: details}
    result = {"rows": kept + rows, "machine": env["gpu"] or "CPU", "date": time.strftime("%Y-%m-%d"),
              "details": details_all}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    errors = sum(r["errors_5xx"] - r["errors_503"] for r in rows)
    return 0 if errors == 0 else 1


def speed_row(model: str, pipeline: str, clients: int, requests: int, req_s: float, latency: dict, errors: dict,
              per_call: dict | None = None, step_ms: dict | None = None) -> dict:  # fmt: skip
    """One row of serve_speed_*.json: errors_5xx counts every 5xx answer, 503 (back-pressure) included."""
    five = sum(n for kind, n in errors.items() if kind.startswith("http_5"))
    row = {"model": model, "pipeline": pipeline, "clients": clients, "req_s": round(req_s, 3),
           "p50_ms": round(latency["p50"], 1), "p95_ms": round(latency["p95"], 1), "p99_ms": round(latency["p99"], 1),
           "requests": requests, "errors_5xx": five, "errors_503": errors.get("http_503", 0),
           "errors_other": sum(errors.values()) - five}  # fmt: skip
    if per_call:
        row["requests_per_model_call"] = per_call
    if step_ms:
        row["step_ms_mean"] = step_ms
    return row


if __name__ == "__main__":
    sys.exit(main())
