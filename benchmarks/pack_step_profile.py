"""Where one packed training step's time goes: the pack's forward and backward (a CUDA graph replay on
a GPU), the gradients handed to each trial, each trial's optimizer (GaLore: projection, Adam update,
projection back, the unprojected weights) and schedule, and the losses read back.

Two passes over the same pack (trainers/packed_run.py ``Pack`` or trainers/stacked_galore.py
``GaloreStack``, in this process, no Ray): the first times whole steps as they run (no extra waits);
the second waits for the GPU at the edge of each part, so each part's time is its own (their sum is
above a free-running step's). A torch.profiler table of the busiest host and GPU operations follows.

    python benchmarks/pack_step_profile.py --model DIR --data DATA --method galore --out pack_step_galore_h100.json
    duetto model tiny /tmp/tiny && python benchmarks/pack_step_profile.py --model /tmp/tiny --data DATA --cpu --steps 3 --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections import defaultdict
from pathlib import Path


def _wrap(owner, name: str, label: str, seconds: dict, counts: dict, sync, undo: list) -> None:
    """Time ``owner.name`` under ``label`` (GPU waited for at both edges); ``undo`` gets what puts it back."""
    inner = getattr(owner, name)
    had_own = name in vars(owner)  # an instance attribute (a schedule's wrapped step) or the class's
    undo.append(lambda: setattr(owner, name, inner) if had_own else delattr(owner, name))

    def timed(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = inner(*a, **k)
        sync()
        seconds[label] += time.perf_counter() - t0
        counts[label] += 1
        return out

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="folder with train.jsonl and test.jsonl")
    ap.add_argument("--method", choices=["qlora", "galore"], default="galore")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8], help="QLoRA's base")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing (the graph is captured there)")
    ap.add_argument("--steps", type=int, default=30, help="steps timed in each pass")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import new_pack

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps_total = args.warmup + 2 * args.steps + 5
    common = [f"model={args.model}", f"data.train={args.data}/train.jsonl", f"data.test={args.data}/test.jsonl",
              f"method={args.method}", "max_seq_len=128", "batch_size=2", f"max_steps={steps_total}",
              f"qlora.bits={args.bits}", "scaling.num_workers=0", "galore.layerwise=true",
              "galore.target_modules=[self_attn,mlp]", "output_dir=/tmp/pack-step-profile"]  # fmt: skip
    # the study sweep's spread of settings, one per trial
    ranks, gaps, scales, rs = [64, 128, 256, 128], [100, 200, 500, 200], [0.125, 0.25, 0.5, 0.25], [4, 8, 16, 8]
    cfgs = [load_config(TrialConfig, None, common + [f"seed={i}", f"galore.rank={ranks[i % 4]}", f"galore.update_proj_gap={gaps[i % 4]}",
                                                     f"galore.scale={scales[i % 4]}", f"qlora.r={rs[i % 4]}",
                                                     f"output_dir=/tmp/pack-step-profile/t{i}"])  # fmt: skip
            for i in range(args.trials)]
    pack = new_pack(args.method, device)
    for c in cfgs:
        pack.join(c)
    def ms_per_step(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            pack.step()
        sync()
        return (time.perf_counter() - t0) / n * 1e3

    ms_per_step(args.warmup)
    step_ms = ms_per_step(args.steps)  # pass 1: free-running steps

    # a step at which every GaLore trial refreshes its projections (an SVD per weight): its step count
    # set back to a multiple of every gap (bias correction restarts; the time is what matters here)
    refresh_ms = None
    if args.method == "galore":
        for opt in pack.optimizers.values():
            opt.steps_done = 0
        refresh_ms = ms_per_step(1)

    # pass 2: each part timed on its own
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    undo: list = []
    from duetto.trainers import graph_step

    _wrap(graph_step.GraphedStep, "__call__", "forward+backward (graph)", seconds, counts, sync, undo)
    if args.method == "galore":
        from duetto.trainers import galore_fused, stacked_galore

        _wrap(stacked_galore.StackedWeights, "hand_out_grads", "hand out gradients", seconds, counts, sync, undo)
        _wrap(galore_fused._ProjectedGroup, "project", "  projection of a weight's gradient", seconds, counts, sync, undo)
        _wrap(galore_fused._ProjectedGroup, "step", "  projected groups' Adam + projection back", seconds, counts, sync, undo)
        _wrap(galore_fused._ProjectedGroup, "project_all", "  projection of a group's gradients", seconds, counts, sync, undo)
        _wrap(galore_fused._PlainGroup, "step", "  unprojected weights' Adam", seconds, counts, sync, undo)
        _wrap(galore_fused._SmallGroup, "step", "  small weights' Adam", seconds, counts, sync, undo)
    else:
        _wrap(torch.nn.utils, "clip_grad_norm_", "gradient clip", seconds, counts, sync, undo)
    # each optimizer's own step (its schedule wraps the step on the instance)
    optimizers = pack.optimizers if args.method == "galore" else pack.optim.optimizers
    for opt in optimizers.values():
        _wrap(opt, "step", "optimizer step (all of it)", seconds, counts, sync, undo)
    timed_step_ms = ms_per_step(args.steps)
    for put_back in reversed(undo):
        put_back()
    parts = {k: {"ms_per_step": round(v / args.steps * 1e3, 3), "calls_per_step": counts[k] / args.steps}
             for k, v in seconds.items()}  # fmt: skip

    # the busiest operations of a few free-running steps (the parts' waits taken out again)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            pack.step()
        sync()
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    table_gpu = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15) if device.type == "cuda" else ""

    machine = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{args.method}: {args.trials} trials in one pack on {machine}: {step_ms:.1f} ms a step free-running, "
          f"{timed_step_ms:.1f} ms with a wait at each part's edges"
          + (f"; a step where every trial refreshes: {refresh_ms:.0f} ms" if refresh_ms is not None else ""))  # fmt: skip
    print(f"{'part':<48}{'ms/step':>9}{'calls/step':>12}")
    for k, v in parts.items():
        print(f"{k:<48}{v['ms_per_step']:>9.2f}{v['calls_per_step']:>12.1f}")
    print(table_cpu)
    print(table_gpu)
    result = {"method": args.method, "trials": args.trials, "bits": args.bits if args.method == "qlora" else None,
              "step_ms": round(step_ms, 2), "step_ms_with_waits": round(timed_step_ms, 2), "parts": parts,
              "refresh_step_ms": None if refresh_ms is None else round(refresh_ms, 1),
              "uses_graphs": pack.uses_graphs(), "profile_cpu": table_cpu, "profile_gpu": table_gpu,
              "machine": machine, "date": datetime.date.today().isoformat()}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
