"""A sweep of study-config trials, packed (`packing: qlora` / `galore`) and unpacked, beside one plain-HF trial.

    # GPU (SmolLM2-135M random weights are enough for speed; DATA from `duetto data prepare`):
    python benchmarks/sweep_packing.py --model DIR --data DATA --out benchmarks/results/sweep_packing_h200.json
    # the same split over two calls (for time-limited device calls): the second adds to the file
    python benchmarks/sweep_packing.py --model DIR --data DATA --modes unpacked --out OUT.json
    python benchmarks/sweep_packing.py --model DIR --data DATA --modes packed --append --out OUT.json
    # GaLore's search too (packed: its trials train on stacked weights)
    python benchmarks/sweep_packing.py --model DIR --data DATA --methods galore --append --out OUT.json
    # CPU smoke run on the tiny model (--full-sweep there keeps --cpu's small evaluations and no GPUs):
    python benchmarks/sweep_packing.py --model tiny --data DATA --steps 6 --anchor-steps 4 --cpu --out /tmp/sp.json

Both modes run one method's search of --sweep (configs/sweep_study.yaml; QLoRA unless --methods says
otherwise) with the same sampled configs (the sweep's seed), FIFO (no early stopping, so every
config trains to the end in both modes and can be compared), --steps steps each. Reported per mode:
the summed trained tokens of all trials over the sweep's wall clock (end to end, start-up and
evaluation included; `ratio` to the anchor), the sum of the trials' own tokens/s (each over the steps
it took part in: the rate at which the sweep trains while it steps; `step_ratio`), and the wall time, and where a trial's wall time went (`trial_phase_seconds`, the mean of the trials'
metrics.json `phase_seconds`: set-up, train, eval loss, generation and, packed, interim reports and
the time it waited in its pack; unpacked, `train` is `trainer.train()` whole, its interim evaluations
included, packed it is the pack steps alone); each method's anchor is plain HF `Trainer` on one study-config trial of it
(benchmarks/trial_speed.py: QLoRA int8, GaLore layer-wise 8-bit). `agreement` pairs each config's
final eval loss packed and alone. With --full-sweep it also times the shipped sweep file as it is
(both methods, ASHA) with packing on for both methods (`packing: all`): `sweep_study_wall_seconds`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


#: each method's plain-HF anchor: one study-config trial of it (benchmarks/trial_speed.py)
ANCHOR = {"qlora": "qlora-int8", "galore": "galore"}


def run_sweep(sweep_file: str, overrides: list[str], num_cpus: int | None) -> tuple[Path, float]:
    import ray

    from duetto.config import load_config
    from duetto.tune.results import write_report
    from duetto.tune.spec import SweepConfig
    from duetto.tune.sweep import start_sweep

    sweep = load_config(SweepConfig, sweep_file, overrides)
    ray.shutdown()
    t0 = time.perf_counter()
    try:
        sweep_dir = start_sweep(sweep, num_cpus=num_cpus)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    write_report(sweep_dir)
    return sweep_dir, wall


def one_method(sweep_file: str, method: str, out: Path) -> str:
    """The sweep file with one method's search alone (paths inside stay relative to the repo root)."""
    import yaml

    data = yaml.safe_load(Path(sweep_file).read_text())
    data["methods"] = {method: data["methods"][method]}
    if isinstance(data.get("num_samples"), dict):
        data["num_samples"] = {method: data["num_samples"][method]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(out)


def trials(sweep_dir: Path) -> dict[str, dict]:
    """{config key: metrics.json} of every finished trial of a sweep folder."""
    out = {}
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        params = json.loads((metrics_file.parent / "params.json").read_text())["trial"]
        key = json.dumps({k: v for k, v in sorted(params.items())})
        out[key] = json.loads(metrics_file.read_text())
    return out


def mean_phases(phases: list[dict[str, float]]) -> dict[str, float]:
    """A trial's wall time by phase (metrics.json ``phase_seconds``): each phase's mean over the trials
    that report it."""
    keys = dict.fromkeys(k for p in phases for k in p)
    return {k: sum(p[k] for p in phases if k in p) / sum(k in p for p in phases) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model dir (or fetch name, e.g. tiny)")
    ap.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl")
    ap.add_argument("--sweep", default="configs/sweep_study.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--anchor-steps", type=int, default=100)
    ap.add_argument("--work", default="/tmp/sweep-packing")
    ap.add_argument("--cpu", action="store_true", help="CPU smoke run: no GPUs, small evaluations")
    ap.add_argument("--full-sweep", action="store_true", help="also time the shipped sweep file with packing on")
    ap.add_argument("--modes", default="unpacked,packed",
                    help="which runs now (comma-separated; empty with --full-sweep: the shipped sweep alone)")
    ap.add_argument("--methods", default="qlora",
                    help="whose search runs (comma-separated: qlora, galore)")
    ap.add_argument("--append", action="store_true",
                    help="keep --out's anchors, rows and trials of the methods and modes not run now (one run split over calls)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if (not modes and not args.full_sweep) or set(modes) - {"unpacked", "packed"}:
        ap.error(f"--modes: unpacked and/or packed (or none, with --full-sweep), got {args.modes!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(ANCHOR):
        ap.error(f"--methods: qlora and/or galore, got {args.methods!r}")
    prev = json.loads(Path(args.out).read_text()) if args.append and Path(args.out).exists() else {}
    for key, value in (("steps", args.steps), ("sweep", args.sweep), ("model", args.model)):
        if prev and prev.get(key) != value:
            ap.error(f"--append: {args.out} was measured with {key} {prev.get(key)!r}, this call has {value!r}")

    import torch

    from trial_speed import anchor, study_config

    work = Path(args.work)
    common = [f"base.model={args.model}", f"base.data.train={args.data}/train.jsonl",
              f"base.data.test={args.data}/test.jsonl", f"base.max_steps={args.steps}", "scheduler.type=fifo"]  # fmt: skip
    cpu_overrides = []
    if args.cpu:
        cpu_overrides = ["resources.gpus_per_trial=0", "resources.cpus_per_trial=0.5", "base.eval.num_examples=2",
                         "base.eval.max_new_tokens=4", "base.eval.loss_examples=8", "base.interim_eval_examples=0",
                         "base.report_every_steps=0", "base.max_seq_len=64", "base.data.limit_train=64",
                         "metric=eval_loss"]  # fmt: skip
        common += cpu_overrides
    num_cpus = 4 if args.cpu else None
    now = {(method, mode) for method in methods for mode in modes}
    rows = [r for r in prev.get("rows", []) if (r["method"], r["mode"]) not in now]
    runs = {run: done for run, done in prev.get("trials", {}).items() if tuple(run.split("/")) not in now}
    anchors = dict(prev.get("anchors", {}))
    for method in methods:
        if not args.cpu and modes and method not in anchors:  # the anchor times CUDA steps: none on CPU
            cfg = study_config(ANCHOR[method], args.model, args.data, args.anchor_steps, work / f"anchor_{method}")
            anchors[method] = anchor(cfg)["tokens_per_s"]
        anchor_tps = anchors.get(method, float("nan"))
        for mode in modes:
            packing = method if mode == "packed" else "off"
            scratch = work / f"{method}_{mode}"
            shutil.rmtree(scratch, ignore_errors=True)  # this script's scratch: a sweep there would be resumed, not rerun
            sweep_dir, wall = run_sweep(one_method(args.sweep, method, work / f"sweep_{method}.yaml"),
                                        common + [f"packing={packing}", f"storage_path={scratch}"], num_cpus)  # fmt: skip
            finished = trials(sweep_dir)
            done = {key: {k: m[k] for k in ("eval_loss", "trained_tokens", "tokens_per_second", "refresh_step_seconds") if k in m}
                    for key, m in finished.items()}  # fmt: skip
            runs[f"{method}/{mode}"] = done
            tokens = sum(m["trained_tokens"] for m in done.values())
            step_rate = sum(m["tokens_per_second"] for m in done.values())
            rows.append({"method": method, "mode": mode, "trials": len(done),
                         "trial_phase_seconds": mean_phases([m.get("phase_seconds", {}) for m in finished.values()]),
                         "aggregate_tokens_per_s": tokens / wall,
                         "sum_trial_tokens_per_s": step_rate, "anchor_tokens_per_s": anchor_tps,
                         "ratio": tokens / wall / anchor_tps, "step_ratio": step_rate / anchor_tps,
                         "wall_seconds": wall, "trained_tokens": tokens,
                         "fast_path": sorted({m.get("fast_path", "") for m in finished.values()})})  # fmt: skip
            refresh = [m["refresh_step_seconds"] for m in finished.values() if "refresh_step_seconds" in m]
            if refresh:  # GaLore stacks: of a trial's train phase, the steps with a projection refresh
                rows[-1]["refresh_step_seconds"] = sum(refresh) / len(refresh)
    agreement = []
    for method in ANCHOR:
        packed, alone = runs.get(f"{method}/packed", {}), runs.get(f"{method}/unpacked", {})
        agreement += [{"method": method, "config": json.loads(k), "eval_loss_packed": packed[k]["eval_loss"],
                       "eval_loss_alone": alone[k]["eval_loss"]} for k in sorted(packed.keys() & alone.keys())]  # fmt: skip
    full_wall, full_trials = None, prev.get("sweep_study_trials")
    if args.full_sweep:
        shutil.rmtree(work / "full", ignore_errors=True)
        full_dir, full_wall = run_sweep(args.sweep, [f"base.model={args.model}", f"base.data.train={args.data}/train.jsonl",
                                              f"base.data.test={args.data}/test.jsonl", "packing=all",
                                              f"storage_path={work / 'full'}", *cpu_overrides], num_cpus)  # fmt: skip
        # the trials that ran to the end (ASHA's stopped ones write no metrics.json): where their time went
        full_trials = {Path(m.parent).name: {k: m_json[k] for k in ("step", "wall_seconds", "tokens_per_second", "fast_path",
                                                                    "phase_seconds", "refresh_step_seconds") if k in m_json}
                       for m in sorted(full_dir.glob("*/metrics.json")) for m_json in [json.loads(m.read_text())]}  # fmt: skip
    full_wall = full_wall if full_wall is not None else prev.get("sweep_study_wall_seconds")
    rows.sort(key=lambda r: (r["method"], r["mode"] != "unpacked"))
    result = {"rows": rows, "sweep_study_wall_seconds": full_wall, "sweep_study_trials": full_trials, "agreement": agreement,
              "anchors": anchors, "trials": runs,
              "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else "CPU",
              "date": datetime.date.today().isoformat(), "steps": args.steps, "sweep": args.sweep,
              "model": args.model}  # fmt: skip
    print(f"{'method':<8}{'mode':<10}{'trials':>7}{'agg tok/s':>12}{'ratio':>8}{'sum trial tok/s':>17}{'ratio':>8}"
          f"{'anchor':>9}{'wall s':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['method']:<8}{r['mode']:<10}{r['trials']:>7}{r['aggregate_tokens_per_s']:>12.0f}{r['ratio']:>8.2f}"
              f"{r['sum_trial_tokens_per_s']:>17.0f}{r.get('step_ratio', float('nan')):>8.2f}{r['anchor_tokens_per_s']:>9.0f}"
              f"{r['wall_seconds']:>9.0f}")  # fmt: skip
    for r in rows:
        if r.get("trial_phase_seconds"):
            print(f"  {r['method']} {r['mode']}, a trial's mean seconds: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["trial_phase_seconds"].items())
                  + (f" (of train, steps with a projection refresh {r['refresh_step_seconds']:.1f})" if "refresh_step_seconds" in r else ""))
    for a in agreement:
        rel = abs(a["eval_loss_packed"] - a["eval_loss_alone"]) / abs(a["eval_loss_alone"])
        print(f"  {a['config']}: eval_loss packed {a['eval_loss_packed']:.4f} alone {a['eval_loss_alone']:.4f} ({rel:.2%})")
    if full_wall is not None:
        print(f"{args.sweep} as shipped, packing on: {full_wall:.0f} s end to end")
        for name, m in (full_trials or {}).items():
            print(f"  {name}: {m.get('wall_seconds', 0):.0f} s, " + ", ".join(f"{k} {v:.1f}" for k, v in m.get("phase_seconds", {}).items())
                  + (f" (of train, steps with a projection refresh {m['refresh_step_seconds']:.1f})" if "refresh_step_seconds" in m else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
