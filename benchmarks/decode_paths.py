"""The generator's decoding paths side by side, one process, one GPU, no Serve: which one Serve should run.

On the random SmolLM2-135M QLoRA trial of `serve_bench.py` (adapter merged into bf16 weights, as Serve
loads it), for 1, 4, 16 and 32 prompts x k samples x --new-tokens tokens (temperature 0.8, top-p 0.95):

- static: ``generate_candidates`` on static shapes (``StaticDecoding``, every bucket compiled first):
  what the Serve generator runs, one batched call per group of requests;
- dynamic: the same call on transformers' default dynamic cache (the naive pipeline's decoding);
- continuous: transformers' continuous batching (``generate_batch`` with one persistent manager, paged
  KV cache): the rows are scheduled per decoding step, so a request arriving mid-call could join at
  the next step.

Each path runs each size --calls times after a warm-up call; the table gives the mean seconds per
call and the generated tokens per second. Writes --out as JSON.

    python benchmarks/decode_paths.py --smollm2-dir DIR --out benchmarks/results/decode_paths_h100.json
    # CPU smoke run of the same paths (a few minutes on 2 cores):
    python benchmarks/decode_paths.py --smollm2-dir DIR --sizes 1 --calls 1 --new-tokens 8 --out /tmp/decode_paths.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import traceback
from pathlib import Path



def timed(fn, calls: int) -> list[float]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()  # warm-up: first-call costs never count
    out = []
    for _ in range(calls):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-dir", required=True)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sizes", default="1,4,16,32", help="prompts per call")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--row-buckets", default="4,16,64,128", help="the static path's row buckets (Serve's default)")
    ap.add_argument("--paths", default="static,dynamic,continuous")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from serve_bench import merged_generator  # benchmarks/ is on sys.path when this runs
    from transformers import GenerationConfig

    from duetto.trainers.inference import StaticDecoding, generate_candidates

    sizes = [int(s) for s in args.sizes.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"machine": torch.cuda.get_device_name(0) if device == "cuda" else "CPU", "date": datetime.date.today().isoformat(),
                    "settings": vars(args), "rows": []}  # fmt: skip
    lm, prompts = merged_generator(args.smollm2_dir, device)

    def batch(n: int) -> list[str]:
        return (prompts * (n // len(prompts) + 1))[:n]

    def sample(n: int, static=None):
        return lambda: generate_candidates(lm.model, lm.tokenizer, batch(n), args.k, max_new_tokens=args.new_tokens,
                                           temperature=0.8, top_p=0.95, stop_ids=lm.stop_ids,
                                           max_prompt_tokens=lm.max_seq_len, static=static)  # fmt: skip

    def continuous(n: int):
        ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in batch(n) for _ in range(args.k)]
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                               eos_token_id=lm.stop_ids, pad_token_id=lm.tokenizer.pad_token_id)  # fmt: skip
        # one manager kept across calls (as a server would keep it), so its start-up and CUDA-graph
        # warm-up are paid in the warm-up call only
        return lambda: lm.model.generate_batch(inputs=ids, generation_config=cfg, progress_bar=False,
                                               persistent_manager=True)  # fmt: skip

    def record(path: str, n: int, fn) -> None:
        row = {"path": path, "prompts": n, "rows": n * args.k}
        try:
            ts = timed(fn, args.calls)
            row.update(seconds=[round(t, 4) for t in ts], mean_s=statistics.fmean(ts),
                       generated_tokens_per_s=n * args.k * args.new_tokens / statistics.fmean(ts))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - one failing path must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[-800:]
            row["traceback"] = traceback.format_exc()[-2500:]
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    paths = args.paths.split(",")
    if "static" in paths:
        static = StaticDecoding([int(r) for r in args.row_buckets.split(",")], [256])
        t = time.perf_counter()
        result["static_warm_up"] = static.warm_up(lm.model, lm.tokenizer, lm.stop_ids)
        result["static_warm_up_s"] = round(time.perf_counter() - t, 1)
        for n in sizes:
            record("static", n, sample(n, static))
    if "dynamic" in paths:
        for n in sizes:
            record("dynamic", n, sample(n))
    if "continuous" in paths:
        # largest first: the one manager is sized by the first workload it sees, as a server's would be
        # by its largest batch
        for n in sorted(sizes, reverse=True):
            record("continuous", n, continuous(n))
        lm.model.destroy_cached_continuous_batching_manager()

    print(f"\n{'path':<12}{'prompts':>8}{'rows':>6}{'s/call':>9}{'tok/s':>9}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['path']:<12}{r['prompts']:>8}{r['rows']:>6}  ERROR {r['error'][:90]}")
        else:
            print(f"{r['path']:<12}{r['prompts']:>8}{r['rows']:>6}{r['mean_s']:>9.3f}{r['generated_tokens_per_s']:>9.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
