"""Study-config trials: `duetto train` beside plain Hugging Face `Trainer`, one GPU, same data and seed.

For each model x method (galore = layer-wise 8-bit GaLore, qlora-nf4, qlora-int8) at the study's
settings (batch 2, seq 128, GaLore rank 128 / gap 200 / scale 0.25, QLoRA r 4 / alpha 8 / dropout
0.05, gradient checkpointing on as the study ran it):

- anchor: plain HF `Trainer` with the study's optimizer (`galore_adamw_8bit_layerwise`, or PEFT LoRA
  on a bitsandbytes base with `adamw_torch`), gradient checkpointing, on the same tokenized rows;
- duetto: `run_trial` of configs/galore_study.yaml / qlora_study.yaml (in process: Ray Train's local mode, the GPU
  fast path on by default), the same number of steps, then again for --wall-steps steps for the
  end-to-end wall time.

Each run (ours, the wall-time run, the anchor) is a Python process of its own, so its peak memory is
its own and the anchor runs with PyTorch's defaults. Both count non-padding trained tokens over the
summed step times (CUDA events), and peak memory as the largest `max_memory_allocated` of a step.
Prints a table; writes --out as JSON.

    python benchmarks/trial_speed.py --data DIR --model smollm2=DIR [--model gemma3-1b=DIR] \
        --steps 200 --wall-steps 300 --out benchmarks/results/trial_speed_h200.json

A row takes 3-6 minutes (the anchor is the slow part): where one call's time is limited, measure a
few rows a call with --methods / --model and --append, which keeps the file's other rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

METHODS = {
    "galore": ("configs/galore_study.yaml", ["learning_rate=1e-5"]),
    "qlora-nf4": ("configs/qlora_study.yaml", ["qlora.bits=4"]),
    "qlora-int8": ("configs/qlora_study.yaml", ["qlora.bits=8"]),
}
LOG_EVERY = 10
EVAL_ROWS = 64


def study_config(method: str, model: str, data: str, steps: int, out: Path, extra=()):
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig

    path, overrides = METHODS[method]
    return load_config(TrialConfig, path, [
        f"model={model}", f"data.train={data}/train.jsonl", f"data.test={data}/test.jsonl", f"output_dir={out}",
        f"max_steps={steps}", f"logging_steps={LOG_EVERY}", "eval.num_examples=32", "eval.max_new_tokens=32",
        f"eval.loss_examples={EVAL_ROWS}", "interim_eval_examples=0", "report_every_steps=0", *overrides, *extra,
    ])  # fmt: skip


def mean_loss(curve: list[list[float]], upto: int) -> float:
    vals = [loss for step, loss in curve if step <= upto]
    return statistics.fmean(vals) if vals else float("nan")


def anchor(cfg) -> dict:
    """Plain HF Trainer at the study's settings on the trial's own tokenized rows."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    from duetto.models import load_tokenizer
    from duetto.trainers.compat import checkpointing_args
    from duetto.trainers.trial_data import EncodedDataset, PaddingCollator, load_rows
    from duetto.trainers.trial_reports import StepClock

    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model)
    rows = load_rows(cfg)
    train = EncodedDataset(rows.train, tok, cfg.template, cfg.max_seq_len)
    held = EncodedDataset(rows.loss(cfg), tok, cfg.template, cfg.max_seq_len)
    kw = {}
    if cfg.method == "galore":
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.bfloat16).cuda()
        g = cfg.galore
        kw = dict(optim="galore_adamw_8bit_layerwise", optim_target_modules=list(g.target_modules),
                  optim_args=f"rank={g.rank}, update_proj_gap={g.update_proj_gap}, scale={g.scale}, proj_type={g.proj_type}",
                  **checkpointing_args(True))  # fmt: skip
    else:
        q = cfg.qlora
        bnb = (BitsAndBytesConfig(load_in_8bit=True) if q.bits == 8 else
               BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16))  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(cfg.model, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": 0})  # fmt: skip
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
        model = get_peft_model(model, LoraConfig(r=q.r, lora_alpha=q.alpha, lora_dropout=q.dropout,
                                                 target_modules=list(q.target_modules), task_type="CAUSAL_LM"))  # fmt: skip
        kw = dict(optim="adamw_torch")
    model.config.use_cache = False
    clock, peak = StepClock(), [0]

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            torch.cuda.reset_peak_memory_stats()
            clock.begin()

        def on_step_end(self, args, state, control, **k):
            peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
            clock.end()

    args = TrainingArguments(output_dir="/tmp/anchor", per_device_train_batch_size=cfg.batch_size, bf16=True,
                             learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, max_steps=cfg.max_steps,
                             seed=cfg.seed, data_seed=cfg.seed, logging_steps=LOG_EVERY, save_strategy="no",
                             report_to="none", disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
                             include_num_input_tokens_seen="non_padding", per_device_eval_batch_size=8, **kw)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held,
                      data_collator=PaddingCollator(tok.pad_token_id), callbacks=[Measure()])  # fmt: skip
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    curve = [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]
    eval_loss = trainer.evaluate()["eval_loss"]
    seconds = clock.seconds()
    return {"tokens_per_s": trainer.state.num_input_tokens_seen / seconds, "peak_memory_bytes": peak[0],
            "train_loss_curve": curve, "eval_loss": eval_loss, "train_seconds": seconds, "train_wall_seconds": train_wall}


def ours(cfg) -> dict:
    from duetto.trainers.trial import run_trial

    t0 = time.perf_counter()
    m = run_trial(cfg, overwrite=True)
    m["command_wall_seconds"] = time.perf_counter() - t0
    return m


def run_part(part: str, method: str, path: str, args) -> dict:
    """One measured run: ``ours`` (--steps), ``wall`` (--wall-steps) or ``anchor``."""
    work = Path(args.work) / f"{Path(path).name}_{method}"
    steps = args.wall_steps if part == "wall" else args.steps
    cfg = study_config(method, path, args.data, steps, work / part, args.extra)
    return anchor(cfg) if part == "anchor" else ours(cfg)


def in_own_process(part: str, method: str, path: str, args) -> dict:
    """``run_part`` in a fresh Python: each run's peak memory is its own (a model another run left
    allocated would count), and the anchor runs with PyTorch's defaults, not settings a trial made
    for its process."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part", part, "--part-method", method, "--part-model", path,
               "--part-out", str(out), "--data", args.data, "--model", f"part={path}", "--steps", str(args.steps),
               "--wall-steps", str(args.wall_steps), "--work", args.work, "--out", str(out),
               *[f"--extra={e}" for e in args.extra]]  # fmt: skip
        proc = subprocess.run(cmd, text=True, capture_output=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{part} run failed (rc {proc.returncode}): {(proc.stdout + proc.stderr)[-2500:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--wall-steps", type=int, default=300)
    ap.add_argument("--work", default="/tmp/trial-speed")
    ap.add_argument("--skip-anchor", action="store_true")
    ap.add_argument("--extra", action="append", default=[], help="override for the duetto runs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of an existing --out measured on the same GPU, replacing those of the same "
                         "model and method (one row set per call where a call's time is limited)")
    ap.add_argument("--parts", default="ours,wall,anchor",
                    help="which runs to make; with --append a row's other fields stay as measured before")
    ap.add_argument("--code", default="", help="a label of the code measured (e.g. a commit), kept per part")
    ap.add_argument("--part", choices=("ours", "wall", "anchor"), help=argparse.SUPPRESS)
    ap.add_argument("--part-method", help=argparse.SUPPRESS)
    ap.add_argument("--part-model", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        m = run_part(args.part, args.part_method, args.part_model, args)
        Path(args.part_out).write_text(json.dumps(m, default=str))
        return
    import torch

    rows = []
    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if args.append and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        if earlier.get("machine") != machine:
            raise SystemExit(f"--append: {args.out} was measured on {earlier.get('machine')}, this is {machine}; "
                             "ratios hold across machines, rows of one table should not mix them")  # fmt: skip
        wanted = {(spec.split("=", 1)[0], m) for spec in args.model for m in args.methods.split(",")}
        rows.extend(r for r in earlier["rows"] if (r["model"], r["method"]) not in wanted)
        before = {(r["model"], r["method"]): r for r in earlier["rows"] if (r["model"], r["method"]) in wanted}
    else:
        earlier, before = {}, {}
    parts = set(args.parts.split(","))
    if not parts <= {"ours", "wall", "anchor"}:
        raise SystemExit(f"--parts: ours, wall and/or anchor, got {args.parts!r}")
    if args.skip_anchor:
        parts.discard("anchor")
    if before and parts != {"ours", "wall", "anchor"}:
        then = earlier["settings"]
        if (then["steps"], then["wall_steps"], then.get("extra", [])) != (args.steps, args.wall_steps, args.extra):
            raise SystemExit(f"--parts with --append: {args.out} was measured with steps {then['steps']}, "
                             f"wall steps {then['wall_steps']}, extra {then.get('extra', [])}; a row must not mix them")  # fmt: skip
    # --append keeps what else the file says (a note, a command line) beside the rows it rewrites
    kept = {k: v for k, v in earlier.items() if k != "rows"}
    result = {**kept, "rows": rows, "machine": machine, "date": datetime.date.today().isoformat(),
              "settings": {**kept.get("settings", {}), "steps": args.steps, "wall_steps": args.wall_steps,
                           "log_every": LOG_EVERY, "eval_rows": EVAL_ROWS, "extra": args.extra}}  # fmt: skip
    for spec in args.model:
        name, path = spec.split("=", 1)
        for method in args.methods.split(","):
            # a part not run now keeps its fields from the earlier row (--append)
            stale = {"error", "traceback", *(f"code_{p}" for p in parts)}
            row = {k: v for k, v in before.get((name, method), {}).items() if k not in stale}
            row.update(model=name, method=method, variant="duetto train (fast path) vs HF Trainer")
            try:
                if "ours" in parts:
                    m = in_own_process("ours", method, path, args)
                    row.update(tokens_per_s=m["tokens_per_second"], peak_memory_bytes=m["peak_memory_bytes"],
                               train_loss_mean_200=mean_loss(m.get("train_loss_curve", []), 200),
                               eval_loss=m["eval_loss"], fast_path=m.get("fast_path"),
                               train_loss_curve=m.get("train_loss_curve", []))  # fmt: skip
                if "wall" in parts:
                    wall = in_own_process("wall", method, path, args)
                    row.update(train_seconds=wall["train_seconds"], wall_seconds=wall["wall_seconds"],
                               command_wall_seconds=wall["command_wall_seconds"], wall_steps=args.wall_steps,
                               wall_tokens_per_s=wall["tokens_per_second"],
                               wall_phase_seconds=wall.get("phase_seconds"))  # fmt: skip
                if "anchor" in parts:
                    a = in_own_process("anchor", method, path, args)
                    row.update(anchor_tokens_per_s=a["tokens_per_s"], anchor_peak_memory_bytes=a["peak_memory_bytes"],
                               anchor_train_loss_mean_200=mean_loss(a["train_loss_curve"], 200),
                               anchor_eval_loss=a["eval_loss"], anchor_train_seconds=a["train_seconds"],
                               anchor_train_loss_curve=a["train_loss_curve"])  # fmt: skip
                if row.get("tokens_per_s") and row.get("anchor_tokens_per_s"):
                    row["ratio"] = row["tokens_per_s"] / row["anchor_tokens_per_s"]
                    row["memory_ratio"] = row["peak_memory_bytes"] / row["anchor_peak_memory_bytes"]
                if args.code:
                    row.update({f"code_{p}": args.code for p in parts})
            except Exception as e:  # one failing row must not hide the others
                import traceback

                row["error"] = f"{type(e).__name__}: {e}"[-1500:]
                row["traceback"] = traceback.format_exc()[-3000:]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if "curve" not in k})[:1500], flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"\n{'model':10} {'method':11} {'tok/s':>8} {'anchor':>8} {'ratio':>6} {'mem GiB':>8} {'anchor':>7} "
          f"{'loss200':>8} {'anchor':>8} {'eval':>7} {'anchor':>7} {'train s':>8} {'wall s':>7}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['model']:10} {r['method']:11} ERROR {r['error'][:100]}")
            continue
        g = lambda k, f: format(r[k], f) if isinstance(r.get(k), (int, float)) else "-"  # noqa: E731
        print(f"{r['model']:10} {r['method']:11} {g('tokens_per_s', '8.0f')} {g('anchor_tokens_per_s', '8.0f')} "
              f"{g('ratio', '6.1f')} {(r.get('peak_memory_bytes') or 0) / 2**30:8.2f} "
              f"{(r.get('anchor_peak_memory_bytes') or 0) / 2**30:7.2f} {g('train_loss_mean_200', '8.4f')} "
              f"{g('anchor_train_loss_mean_200', '8.4f')} {g('eval_loss', '7.4f')} {g('anchor_eval_loss', '7.4f')} "
              f"{g('train_seconds', '8.1f')} {g('wall_seconds', '7.1f')}")  # fmt: skip


if __name__ == "__main__":
    main()
