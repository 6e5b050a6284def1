"""Where does plain HF sampling time go on the GPU? (issue 5: the bench's plain generate of
8 prompts x 4 samples x 64 tokens took 8.9-9.5 s on an H200 whether or not the CPUs were loaded,
against the issue's 1.79 s reference.)

Times, on one model, the same 8 x k x N sampling call several ways, each twice (cold: the first call
of that variant; warm: the second): duetto's `generate_candidates` (what the bench and the server
run), HF `generate` with and without `output_logits` and `disable_compile=True`, and smaller batches
new to the process. After each it records how many frames torch.compile has captured, to tell HF's
auto-compile apart from other first-call costs. Prints a line per variant, then one JSON object.

    python benchmarks/generate_diag.py --model DIR [--model DIR ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain what a hash table is.",
    "Write a haiku about autumn.",
    "Summarise the plot of Hamlet in two sentences.",
    "What is the capital of Australia?",
    "Translate 'good morning' into French.",
    "List four prime numbers.",
    "Why is the sky blue?",
]


def timed(fn, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def diagnose(path: str, k: int, new_tokens: int) -> dict:
    import torch

    from duetto.data.prompts import encode_prompt, pad_batch
    from duetto.serve.ensemble import generate_candidates, prompt_text
    from duetto.serve.loading import load_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = load_lm(path, device=device)
    model, tok = lm.model, lm.tokenizer

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    prompts = [prompt_text(tok, lm.template, p) for p in PROMPTS]
    rows = [p for p in prompts for _ in range(k)]
    enc = pad_batch([{"input_ids": encode_prompt(p, tok)} for p in rows], tok.pad_token_id, side="left")
    enc = {key: v.to(device) for key, v in enc.items()}
    # every row runs all new_tokens steps: no stop ids, so the variants compare like with like
    base = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.8,
                top_p=0.95, top_k=0, pad_token_id=tok.pad_token_id)  # fmt: skip

    def rows_of(n: int) -> dict:
        return {key: v[:n] for key, v in enc.items()}

    def hf(inputs, **extra):
        with torch.inference_mode():
            return model.generate(**inputs, **base, **extra)

    # Order matters: the first call of the process pays one-off CUDA costs; each later batch size is new
    # to the process once, with HF's auto-compile allowed (default) or not (disable_compile=True).
    variants = {
        "duetto_generate_candidates_b32": lambda: generate_candidates(
            model, tok, prompts, k, max_new_tokens=new_tokens, temperature=0.8, top_p=0.95, stop_ids=[]
        ),
        "hf_b32": lambda: hf(enc),
        "hf_b32_output_logits": lambda: hf(enc, return_dict_in_generate=True, output_logits=True),
        "hf_b32_no_compile": lambda: hf(enc, disable_compile=True),
        "hf_b1_no_compile": lambda: hf(rows_of(1), disable_compile=True),
        "hf_b1": lambda: hf(rows_of(1)),
        "hf_b8": lambda: hf(rows_of(8)),
        "hf_b16_no_compile": lambda: hf(rows_of(16), disable_compile=True),
        "hf_b16": lambda: hf(rows_of(16)),
    }
    result = {
        "model": path,
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "generation_config": {
            key: str(getattr(model.generation_config, key, None))
            for key in ("cache_implementation", "compile_config", "disable_compile")
        },
        "rows": len(rows),
        "new_tokens": new_tokens,
        "seconds": {},
    }
    for name, fn in variants.items():
        cold = timed(fn, sync)
        warm = timed(fn, sync)
        result["seconds"][name] = {"cold": round(cold, 3), "warm": round(warm, 3),
                                   "warm_ms_per_step": round(1000 * warm / new_tokens, 1),
                                   # frames torch.compile has captured so far: >0 means HF compiled
                                   "dynamo_frames_so_far": dict(torch._dynamo.utils.counters["frames"])}  # fmt: skip
        print(name, result["seconds"][name], flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a model folder (repeatable); "
                    "'gemma3-1b-random:DIR' builds the random gemma-3-1b-it architecture there first")  # fmt: skip
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch
    import transformers

    results = {"torch": torch.__version__, "transformers": transformers.__version__, "models": []}
    for m in args.model:
        if m.startswith("gemma3-1b-random:"):
            from gpu_models import gemma3_1b_random

            m = str(gemma3_1b_random(m.split(":", 1)[1]))
        results["models"].append(diagnose(m, args.k, args.new_tokens))
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
