"""Where a pack's time goes: joining, training steps, interim reports and final evaluation of the
trials it holds (trainers/packed_run.py Pack, or with --method galore trainers/stacked_galore.py
GaloreStack; in this process, no Ray).

    # GPU (random SmolLM2-135M weights are enough; DATA from `duetto data prepare`):
    python benchmarks/pack_phases.py --model DIR --data DATA --out benchmarks/results/pack_phases_h200.json
    # CPU, the tiny model:
    duetto model tiny /tmp/tiny && python benchmarks/pack_phases.py --model /tmp/tiny --data DATA --cpu \
        --out benchmarks/results/pack_phases_cpu.json

The trials are the study's QLoRA (or GaLore) settings (seq 128, batch 2) with seeds 0..N-1, all in one pack, a
report every --every steps (BLEU/ROUGE on 16 held-out rows) and the trial's own final evaluation. The
interim reports due at one step decode together, as do the final evaluations of trials that end at the
same step, as the pack actor makes them (--one-at-a-time: one trial after another, the reference).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--method", choices=["qlora", "galore"], default="qlora")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8], help="QLoRA's base")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--one-at-a-time", action="store_true", help="interim reports and final evaluations one trial at a time (the reference)")
    ap.add_argument("--work", default="/tmp/pack-phases")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.every < 1 or args.steps % args.every:
        ap.error(f"--steps ({args.steps}) must be a multiple of --every ({args.every})")

    import torch

    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import new_pack
    from sweep_packing import mean_phases  # benchmarks/ is on sys.path when this runs

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    common = [f"model={args.model}", f"data.train={args.data}/train.jsonl", f"data.test={args.data}/test.jsonl",
              f"method={args.method}", "max_seq_len=128", "batch_size=2", f"max_steps={args.steps}", f"qlora.bits={args.bits}",
              f"report_every_steps={args.every}", "interim_eval_examples=16", "scaling.num_workers=0"]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + [f"seed={i}", f"output_dir={args.work}/t{i}"]) for i in range(args.trials)]
    pack = new_pack(args.method, device)
    seconds = dict.fromkeys(("join", "steps", "interim_reports", "final_evaluation"), 0.0)
    # within the reports and final evaluations: the eval-loss passes and the BLEU/ROUGE decoding
    parts = {phase: {"eval_losses": 0.0, "decoding": 0.0} for phase in ("interim_reports", "final_evaluation")}
    current = [""]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(phase, fn):
        current[0] = phase
        t0 = time.perf_counter()
        out = fn()
        sync()
        seconds[phase] += time.perf_counter() - t0
        return out

    def part_timer(part, fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            if current[0] in parts:
                parts[current[0]][part] += time.perf_counter() - t0
            return out

        return call

    pack.eval_losses = part_timer("eval_losses", pack.eval_losses)
    pack._answers = part_timer("decoding", pack._answers)

    ids = timed("join", lambda: [pack.join(c, until=0) for c in cfgs])
    for until in range(args.every, args.steps + 1, args.every):
        for t in ids:
            pack.trials[t].until = until

        def run():
            while pack.step():
                pass

        timed("steps", run)
        if until < args.steps:
            if args.one_at_a_time:
                timed("interim_reports", lambda: [pack.interim_report(t) for t in ids])
            else:  # as the pack actor makes the reports due at the same step
                timed("interim_reports", lambda: pack.interim_reports(ids))
    if args.one_at_a_time:
        finished = timed("final_evaluation", lambda: [pack.finish(t) for t in ids])
    else:  # as the pack actor finishes the trials that reach their last step together
        finished = list(timed("final_evaluation", lambda: pack.finish_all(ids)).values())
    total = sum(seconds.values())
    # the same run from each trial's side: its metrics.json phase_seconds (the pack's calls above
    # also hold the saves; a shared report or decoding counts whole for every trial in it)
    trial_phases = {k: round(v, 2) for k, v in mean_phases([m["phase_seconds"] for m in finished]).items()}
    result = {"seconds": {k: round(v, 2) for k, v in seconds.items()}, "total_seconds": round(total, 2),
              "trial_phase_seconds": trial_phases,
              "parts_seconds": {k: {p: round(v, 2) for p, v in d.items()} for k, d in parts.items()},
              "trials": args.trials, "steps": args.steps, "report_every": args.every, "method": args.method,
              "bits": args.bits if args.method == "qlora" else None,
              "eval_examples": cfgs[0].eval.num_examples, "interim_eval_examples": 16, "model": args.model,
              "interim_reports": "one trial at a time" if args.one_at_a_time else "together",
              "machine": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU",
              "date": datetime.date.today().isoformat()}  # fmt: skip
    print(f"{args.trials} trials x {args.steps} steps in one pack on {result['machine']}")
    print(f"{'phase':<18}{'seconds':>9}{'share':>8}")
    for k, v in seconds.items():
        print(f"{k:<18}{v:>9.1f}{v / total:>8.0%}")
    for k, d in parts.items():
        print(f"  {k}: " + ", ".join(f"{p} {v:.1f} s" for p, v in d.items()))
    print("a trial's mean seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in trial_phases.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
