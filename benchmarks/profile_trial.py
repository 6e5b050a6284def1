"""Where a study-config trial's time goes on one GPU: phases, every step's time, GaLore's SVDs.

Runs `run_trial` in process (Ray Train local mode, ``scaling.num_workers=0``) and optionally once more
through a Ray worker, with timers around the trial's phases (set-up and model load, trainer build,
train, evaluation loss, generation, save) and a CUDA-event time for every training step; then times
the projection refresh's SVDs of every GaLore target weight of the model, the library's call against
the other ways of running the same call.

    python benchmarks/profile_trial.py --data DIR --model DIR --methods galore,qlora-nf4 \
        --steps 60 [--ray-worker] [--svd] [--host-profile K] --out profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

PHASES: dict[str, float] = {}
CALLS: dict[str, int] = {}  # how many times each phase ran (evaluation runs inside trainer.train too)
STEPS: list = []  # (begin, end) CUDA events of every training step of the in-process run
PEAKS: list = []  # each step's peak allocated GPU memory (the report callback resets it as a step begins)
HOST_PROFILE_STEPS = 0  # cProfile the host side of this many first steps (--host-profile)
HOST: list = []  # one cProfile.Profile per profiled step
HOST_PHASES: dict = {}  # phase name -> cProfile.Profile of its host side (--host-profile)
# phases outside trainer.train: one profiler runs at a time, and the steps inside train have theirs
HOST_PROFILED_PHASES = ("setup (data, model load, method build)", "generation metrics", "save and report")


@contextmanager
def phase(name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - t0
        CALLS[name] = CALLS.get(name, 0) + 1


def wrap(module, attr: str, name: str) -> None:
    fn = getattr(module, attr)

    def timed(*a, **k):
        with phase(name):
            if not HOST_PROFILE_STEPS or name not in HOST_PROFILED_PHASES:
                return fn(*a, **k)
            import cProfile

            prof = HOST_PHASES.setdefault(name, cProfile.Profile())
            prof.enable()
            try:
                return fn(*a, **k)
            finally:
                prof.disable()

    setattr(module, attr, timed)


def instrument() -> None:
    """Phase timers on the trial's functions; every step's (begin, end) events land in STEPS."""
    from transformers import Trainer

    import duetto.trainers.trial as trial
    from duetto.trainers import trial_reports

    wrap(trial, "_setup", "setup (data, model load, method build)")
    wrap(trial, "_build_trainer", "trainer build")
    wrap(trial, "generation_metrics", "generation metrics")
    wrap(trial, "_save_and_report", "save and report")
    wrap(Trainer, "evaluate", "evaluation loss")
    wrap(Trainer, "train", "trainer.train")
    wrap(Trainer, "_save_checkpoint", "HF checkpoint save (inside trainer.train)")
    make_callback = trial_reports.report_callback_cls

    def timed_callback_cls():
        cls = make_callback()
        wrap(cls, "on_save", "Ray report of a checkpoint (inside trainer.train)")
        return cls

    trial_reports.report_callback_cls = timed_callback_cls
    trial.report_callback_cls = timed_callback_cls
    end = trial_reports.StepClock.end

    def end_and_keep(self):
        if self._open is not None and self.cuda:
            import torch

            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            STEPS.append((self._open, stop))
            PEAKS.append(torch.cuda.max_memory_allocated())
            self._pairs.append((self._open, stop))
            self._open = None
            return
        end(self)

    trial_reports.StepClock.end = end_and_keep
    begin = trial_reports.StepClock.begin

    def begin_and_profile(self):
        if self.cuda and len(STEPS) < HOST_PROFILE_STEPS:
            import cProfile

            import torch

            torch.cuda.synchronize()  # the step's host time, not the previous step's queued work
            HOST.append(cProfile.Profile())
            HOST[-1].enable()
        begin(self)

    def end_and_stop(self):
        end_and_keep(self)
        if HOST and len(STEPS) <= HOST_PROFILE_STEPS and len(HOST) == len(STEPS):
            import torch

            torch.cuda.synchronize()
            HOST[-1].disable()

    trial_reports.StepClock.begin = begin_and_profile
    trial_reports.StepClock.end = end_and_stop


def host_table(prof, top: int = 30) -> str:
    """A profile's functions by cumulative host time (cProfile's table)."""
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()[-12000:]


def run(method: str, model: str, data: str, steps: int, out: Path, workers: int) -> dict:
    import torch

    from trial_speed import study_config  # benchmarks/ is on sys.path when this script runs
    from duetto.trainers.trial import run_trial

    PHASES.clear()
    CALLS.clear()
    STEPS.clear()
    PEAKS.clear()
    HOST.clear()
    HOST_PHASES.clear()
    cfg = study_config(method, model, data, steps, out, [f"scaling.num_workers={workers}"])
    t0 = time.perf_counter()
    m = run_trial(cfg, overwrite=True)
    wall = time.perf_counter() - t0
    if STEPS:
        torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in STEPS]
    steady = ms[10:] or ms
    return {
        "method": method, "workers": workers, "steps": steps, "command_wall_s": wall,
        "phases_s": dict(PHASES), "phase_calls": dict(CALLS), "first_steps_ms": [round(x, 2) for x in ms[:8]],
        "step_ms_median_after_10": statistics.median(steady) if steady else None,
        "step_ms_all": [round(x, 2) for x in ms], "sum_step_s": sum(ms) / 1e3,
        "peak_mib_first_steps": [round(x / 2**20) for x in PEAKS[:6]],
        "peak_mib_max_step": max(range(len(PEAKS)), key=PEAKS.__getitem__) if PEAKS else None,
        "peak_mib_after_10": round(max(PEAKS[10:] or [0]) / 2**20),
        "host_profile_steps": [host_table(p) for p in HOST],
        "host_profile_phases": {k: host_table(p) for k, p in HOST_PHASES.items()},
        "slowest_steps": sorted(((round(x, 1), i) for i, x in enumerate(ms)), reverse=True)[:8],
        "metrics": {k: m.get(k) for k in ("tokens_per_second", "train_seconds", "train_wall_seconds", "wall_seconds",
                                          "peak_memory_bytes", "eval_loss", "fast_path", "trained_tokens")},
    }  # fmt: skip


def svd_probe(config, threads: tuple[int, ...] = (4, 8, 16)) -> dict:
    """The refresh's SVDs for every GaLore target weight shape of a model config, run several ways."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = [tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ("self_attn" in n or "mlp" in n)]  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]
    library = lambda g: torch.linalg.svd(g.float(), full_matrices=False)  # noqa: E731 - GaLoreProjector's call
    result: dict = {"matrices": len(grads), "shapes": sorted({str(s) for s in shapes})}

    def timed(name, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        result[name + "_s"] = round(time.perf_counter() - t0, 4)
        return out

    timed("first_call", lambda: library(grads[0]))
    ref = timed("sequential_library", lambda: [library(g) for g in grads])
    timed("sequential_library_again", lambda: [library(g) for g in grads])

    def same(outs, exact=True):
        worst, signs = 0.0, 0
        for (u, _, vh), (ru, _, rvh) in zip(outs, ref):
            worst = max(worst, (u - ru).abs().max().item(), (vh - rvh).abs().max().item())
            signs += int(((u * ru).sum(0) < 0).sum().item())
        return {"max_abs_diff": worst, "flipped_columns": signs}

    by_shape: dict = {}
    for i, g in enumerate(grads):
        by_shape.setdefault(tuple(g.shape), []).append(i)

    def batched(driver=None):
        outs = [None] * len(grads)
        for idx in by_shape.values():
            u, s, vh = torch.linalg.svd(torch.stack([grads[i] for i in idx]).float(), full_matrices=False, driver=driver)
            for j, i in enumerate(idx):
                outs[i] = (u[j], s[j], vh[j])
        return outs

    result["batched_default"] = same(timed("batched_default", batched))
    for n in threads:
        def threaded(n=n):
            streams = [torch.cuda.Stream() for _ in range(n)]
            main = torch.cuda.current_stream()
            ready = torch.cuda.Event()
            ready.record(main)

            def one(i):
                s = streams[i % n]
                with torch.cuda.stream(s):
                    s.wait_event(ready)
                    out = library(grads[i])
                return out

            with ThreadPoolExecutor(n) as pool:
                outs = list(pool.map(one, range(len(grads))))
            for s in streams:
                main.wait_stream(s)
            return outs

        result[f"threads_{n}"] = same(timed(f"threads_{n}", threaded))
    for driver in ("gesvdj", "gesvda", "gesvd"):
        try:
            outs = timed(f"sequential_{driver}", lambda d=driver: [torch.linalg.svd(g.float(), full_matrices=False,
                                                                                     driver=d) for g in grads])
            result[f"sequential_{driver}"] = same(outs)
            result[f"batched_{driver}"] = same(timed(f"batched_{driver}", lambda d=driver: batched(d)))
        except Exception as e:  # noqa: BLE001
            result[f"{driver}_error"] = str(e)[:300]
    cpu = [g.float().cpu() for g in grads]
    timed("cpu_sequential", lambda: [torch.linalg.svd(g, full_matrices=False) for g in cpu])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", default="galore,qlora-nf4")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ray-worker", action="store_true", help="also run each trial through one Ray worker")
    ap.add_argument("--svd", action="store_true")
    ap.add_argument("--host-profile", type=int, default=0, metavar="K",
                    help="cProfile the host side of the first K training steps (tables in the JSON)")
    ap.add_argument("--work", default="/tmp/profile-trial")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    global HOST_PROFILE_STEPS
    HOST_PROFILE_STEPS = args.host_profile
    instrument()
    out: dict = {"runs": []}
    for method in [m for m in args.methods.split(",") if m]:
        for workers in (0, 1) if args.ray_worker else (0,):
            try:
                r = run(method, args.model, args.data, args.steps, Path(args.work) / f"{method}_{workers}", workers)
            except Exception as e:  # noqa: BLE001 - one failing run must not hide the others
                import traceback

                r = {"method": method, "workers": workers, "error": traceback.format_exc()[-2000:]}
            out["runs"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "step_ms_all" and not k.startswith("host_")}), flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))
    if args.svd:
        from gpu_models import gemma3_1b_config
        from transformers import AutoConfig

        for name, config in (("model", AutoConfig.from_pretrained(args.model)), ("gemma3-1b", gemma3_1b_config())):
            out[f"svd_{name}"] = svd_probe(config)
            print(name, json.dumps(out[f"svd_{name}"]), flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
