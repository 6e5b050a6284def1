"""Trained tokens/s and peak GPU memory of study-config trials, through `duetto train`'s own path.

Runs each (model, method) at the study's settings (seq 128, batch 2, GaLore lr 1e-5 layer-wise 8-bit,
QLoRA r4 a8 on an int8 or NF4 base) for --steps steps via run_trial (Ray Train, one GPU worker) and
prints one row each.

    python benchmarks/train_gpu.py --data DIR --model gemma3-1b-random=PATH --model smollm2=PATH \
        --steps 150 --out results.json [--compile]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "galore": ["method=galore", "learning_rate=1e-5", "galore.layerwise=true"],
    "qlora-int8": ["method=qlora", "learning_rate=2e-5", "qlora.bits=8"],
    "qlora-nf4": ["method=qlora", "learning_rate=2e-5", "qlora.bits=4"],
    # the same without PEFT's fp32 copy of the unquantized weights (qlora.upcast_fp32=false)
    "qlora-int8-noupcast": ["method=qlora", "learning_rate=2e-5", "qlora.bits=8", "qlora.upcast_fp32=false"],
    "qlora-nf4-noupcast": ["method=qlora", "learning_rate=2e-5", "qlora.bits=4", "qlora.upcast_fp32=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder with unified train.jsonl / test.jsonl")
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--compile", action="store_true", help="also run each variant with compile=true")
    ap.add_argument("--work", default="/tmp/duetto-bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.trial import run_trial

    rows = []
    for spec in args.model:
        name, path = spec.split("=", 1)
        for variant in args.variants.split(","):
            for compiled in ([False, True] if args.compile else [False]):
                tag = f"{name}/{variant}{'+compile' if compiled else ''}"
                out = Path(args.work) / tag.replace("/", "_").replace("+", "_")
                overrides = [
                    f"model={path}", f"data.train={args.data}/train.jsonl", f"data.test={args.data}/test.jsonl",
                    f"output_dir={out}", f"max_steps={args.steps}", "eval.num_examples=16", "eval.max_new_tokens=32",
                    "eval.loss_examples=64", "interim_eval_examples=0", "report_every_steps=0", "logging_steps=50",
                    f"compile={str(compiled).lower()}", *VARIANTS[variant],
                ]
                cfg = load_config(TrialConfig, "configs/galore_study.yaml" if "galore" in variant
                                  else "configs/qlora_study.yaml", overrides)
                t0 = time.perf_counter()
                try:
                    m = run_trial(cfg, overwrite=True)
                    row = {"run": tag, "tokens_per_second": m["tokens_per_second"],
                           "peak_gib": m["peak_memory_bytes"] / 2**30, "train_seconds": m["train_seconds"],
                           "steps": m["step"], "train_loss": m["train_loss"], "eval_loss": m["eval_loss"],
                           "trainable_params": m["trainable_params"], "device": m["device"]}
                except Exception as e:  # one failing variant must not hide the others' figures
                    row = {"run": tag, "error": f"{type(e).__name__}: {e}"[-1500:]}
                row["wall_seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(rows, indent=2))

    print(f"\n{'run':40} {'tok/s':>8} {'peak GiB':>9} {'loss':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:40} ERROR {r['error'][:80]}")
        else:
            print(f"{r['run']:40} {r['tokens_per_second']:8.0f} {r['peak_gib']:9.2f} {r['train_loss']:7.3f}")


if __name__ == "__main__":
    main()
