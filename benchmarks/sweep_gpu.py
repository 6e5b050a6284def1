"""Does sharing one GPU between sweep trials pay? Aggregate trained tokens/s of N concurrent trials
(each on 1/N of the GPU) against one trial alone on the whole GPU, per method.

Each phase is a real `duetto sweep` of configs/sweep_study.yaml, cut down to one method, fixed at the
study's hyper-parameters (so every trial does the same work), FIFO (no early stopping) and --steps
steps. Per trial the numbers come from its metrics.json: trained tokens over its own training seconds.
"aggregate" sums those rates over the concurrent trials (they train at the same time); "end to end"
divides all trained tokens by the phase's wall clock, start-up and evaluation included.

    # on the H200 (data from `duetto data prepare --config configs/data_shared.yaml`):
    python benchmarks/sweep_gpu.py --trials 4 --steps 300 --out benchmarks/sweep_gpu.json
    # CPU smoke test of the same path, tiny model, 2 trials sharing 2 cores:
    python benchmarks/sweep_gpu.py --cpu --model tiny --trials 2 --steps 8 --out /tmp/sweep_gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

#: The study's settings of each method (configs/galore_study.yaml, configs/qlora_study.yaml).
STUDY = {
    "galore": {"learning_rate": 1e-5, "rank": 128, "update_proj_gap": 200, "scale": 0.25},
    "qlora": {"learning_rate": 2e-5, "r": 4, "alpha": 8, "bits": 8},
}


def phase(args, method: str, trials: int, work: Path) -> dict:
    from duetto.tune.results import write_report
    from duetto.tune.spec import load_sweep
    from duetto.tune.sweep import start_sweep

    name = f"{method}-x{trials}"
    overrides = [
        f"name={name}", f"storage_path={work / name}", f"num_samples={trials}", f"max_concurrent_trials={trials}",
        "scheduler.type=fifo", "metric=eval_loss", f"base.max_steps={args.steps}", "base.report_every_steps=0",
        "base.interim_eval_examples=0", "base.eval.num_examples=8", "base.eval.max_new_tokens=16",
        "base.eval.loss_examples=32", f"base.model={args.model}",
        f"base.data.train={args.data}/train.jsonl", f"base.data.test={args.data}/test.jsonl",
        f"methods={json.dumps({method: STUDY[method]})}", "packing=off",  # trials sharing a GPU as separate processes
    ]
    if args.cpu:
        cpus = (args.num_cpus - trials * 0.05) / trials
        overrides += ["resources.gpus_per_trial=0", f"resources.cpus_per_trial={cpus:.3f}"]
        if method == "galore":
            overrides.append("methods.galore.rank=8")  # the tiny model is only 64 wide
    else:
        overrides += [f"resources.gpus_per_trial={1 / trials:g}", f"resources.cpus_per_trial={args.cpus_per_trial}"]
    sweep = load_sweep(args.sweep, overrides)
    shutil.rmtree(work / name, ignore_errors=True)
    t0 = time.perf_counter()
    start_sweep(sweep)
    wall = time.perf_counter() - t0
    summary = write_report(work / name)
    metrics = []
    for row in summary["rows"]:
        path = Path(row["trial_dir"]) / "metrics.json"
        if row["status"] != "completed" or not path.exists():
            raise SystemExit(f"{name}: trial {row['trial']} ended {row['status']} {row.get('error', '')}")
        metrics.append(json.loads(path.read_text()))
    tokens = sum(m["trained_tokens"] for m in metrics)
    return {
        "trials": trials,
        "gpus_per_trial": sweep.resources.gpus_per_trial,
        "cpus_per_trial": sweep.resources.cpus_per_trial,
        "per_trial_tokens_per_second": [round(m["tokens_per_second"], 1) for m in metrics],
        "aggregate_tokens_per_second": round(sum(m["tokens_per_second"] for m in metrics), 1),
        "trained_tokens": tokens,
        "phase_wall_seconds": round(wall, 1),
        "end_to_end_tokens_per_second": round(tokens / wall, 1),
        "train_seconds": [round(m["train_seconds"], 1) for m in metrics],
        "peak_memory_gib": [round(m["peak_memory_bytes"] / 2**30, 2) for m in metrics],
        "device": metrics[0].get("device"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default="configs/sweep_study.yaml")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model spec (fetch name, path, or tiny)")
    ap.add_argument("--data", default="duetto-runs/data", help="folder with unified train.jsonl / test.jsonl")
    ap.add_argument("--methods", default="galore,qlora")
    ap.add_argument("--trials", type=int, default=4, help="concurrent trials sharing the GPU (each gets 1/N)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cpus-per-trial", type=float, default=2.0)
    ap.add_argument("--cpu", action="store_true", help="smoke test without a GPU: trials share the CPUs instead")
    ap.add_argument("--num-cpus", type=int, default=2, help="with --cpu: CPUs of the local Ray")
    ap.add_argument("--work", default="/tmp/duetto-sweep-bench")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import ray

    from duetto.ray_connect import connect

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    connect(num_cpus=args.num_cpus if args.cpu else None, num_gpus=0 if args.cpu else None)
    report = {"model": args.model, "steps": args.steps, "cluster": ray.cluster_resources(), "methods": {}}
    for method in args.methods.split(","):
        together = phase(args, method, args.trials, Path(args.work))
        alone = phase(args, method, 1, Path(args.work))
        speedup = together["aggregate_tokens_per_second"] / alone["aggregate_tokens_per_second"]
        report["methods"][method] = {"concurrent": together, "alone": alone, "aggregate_speedup": round(speedup, 2)}
        share = f"{together['cpus_per_trial']:g} CPU" if args.cpu else f"{together['gpus_per_trial']:g} GPU"
        print(
            f"{method}: {args.trials} trials at {share} each: "
            f"{together['aggregate_tokens_per_second']:.0f} tok/s together "
            f"({', '.join(f'{x:.0f}' for x in together['per_trial_tokens_per_second'])}) vs "
            f"{alone['aggregate_tokens_per_second']:.0f} tok/s alone = x{speedup:.2f}; end to end "
            f"{together['end_to_end_tokens_per_second']:.0f} vs {alone['end_to_end_tokens_per_second']:.0f} tok/s",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
