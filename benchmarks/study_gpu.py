"""The study reproduced on a GPU, through the product's own code paths.

Stage `prep`: convert the model (`--model`: SmolLM2-135M-Instruct, or Gemma-3-270M) from its GGUF and
prepare the shared data (seed 0; `--data` points a second model's work folder at the same split).
Stage `train`: prep, then run the study-config trials (configs/qlora_study.yaml,
configs/galore_study.yaml: seq 128, batch 2, 2 epochs, QLoRA int8 r4 a8 lr 2e-5, GaLore layer-wise
8-bit lr 1e-5) into WORK/{method}_study. With `--from-sweep DIR` it trains instead at the best
settings that sweep found (each method's best trial's own config, for the full 2 epochs) into
WORK/{method}_best. Stage `report`: `duetto report configs/report_study.yaml` on the study trials
(or, with `--trials best`, on the best-settings ones). Each stage skips what is already done, so the
stages can run in separate device calls; after one `prep`, `train --methods qlora` and
`train --methods galore` can run at the same time (one GPU each: benchmarks/h200_session.sh).

    python benchmarks/study_gpu.py train  --gguf FILE --shared DIR --work /tmp/study
    python benchmarks/study_gpu.py report --work /tmp/study --out $OUT/study
    python benchmarks/study_gpu.py train  --work /tmp/study --from-sweep SWEEP_DIR
    python benchmarks/study_gpu.py report --work /tmp/study --trials best --out $OUT/study_best
    python benchmarks/study_gpu.py train  --model gemma-3-270m --gguf FILE --work /tmp/gemma --data /tmp/study/data
    # CPU smoke run of the same path: add --set scaling.use_gpu=false --set max_steps=3 (train) and
    # --set num_examples=8 --set bootstrap=50 (report)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METRIC_KEYS = ("method", "train_loss", "eval_loss", "bleu4", "rougeL", "peak_memory_bytes", "tokens_per_second",
               "train_seconds", "step")  # fmt: skip


def prep(args, work: Path, model_dir: Path, data: Path) -> None:
    from duetto.config import load_config
    from duetto.data.unify import DataConfig, prepare
    from duetto.model_fetch import fetch

    t0 = time.perf_counter()
    fetch(args.model, work / "models", gguf=args.gguf)
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (data / "manifest.json").exists():
        shared = Path(args.shared)
        prepare(load_config(DataConfig, "configs/data_shared.yaml", [
            f"sources=[{{kind: alpaca, path: {shared}/alpaca_en_demo.json}}, "
            f"{{kind: tulu, path: {shared}/tulu_v2_sample.jsonl}}, "
            f"{{kind: ultrachat, path: {shared}/ultrachat_sample.jsonl}}]", f"out={data}"]))  # fmt: skip


def train(args, work: Path, model_dir: Path, data: Path) -> None:
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.trial import run_trial

    best = json.loads((Path(args.from_sweep) / "best.json").read_text()) if args.from_sweep else None
    for method in args.methods.split(","):
        out = work / f"{method}_{'best' if best else 'study'}"
        if (out / "metrics.json").exists():
            continue
        common = [f"model={model_dir}", f"data.train={data}/train.jsonl", f"data.test={data}/test.jsonl",
                  f"output_dir={out}", "eval.num_examples=64", "logging_steps=50", "scaling.use_gpu=true"]  # fmt: skip
        if best is None:
            cfg = load_config(TrialConfig, f"configs/{method}_study.yaml", [*common, *args.set])
        else:
            if method not in best:
                raise SystemExit(f"{args.from_sweep}/best.json: no completed {method} trial")
            # the sweep's trials were cut short (max_steps) and scored on rows held out of train (for
            # ASHA): train the winner's settings on all train rows for the study's full 2 epochs instead
            trial_cfg = Path(best[method]["trial_dir"]) / "config.yaml"
            if not trial_cfg.is_file():  # best.json kept from an earlier machine: its own copy of the config
                import yaml

                if not best[method].get("config"):
                    raise SystemExit(f"{args.from_sweep}/best.json: {method} has neither {trial_cfg} nor a config")

                trial_cfg = work / f"{method}_best_config.yaml"
                trial_cfg.parent.mkdir(parents=True, exist_ok=True)
                trial_cfg.write_text(f"# duetto train\n{yaml.safe_dump(best[method]['config'], sort_keys=False)}")
            cfg = load_config(TrialConfig, str(trial_cfg), [
                *common, "max_steps=-1", "epochs=2", "report_every_steps=0", "interim_eval_examples=0",
                "data.val_size=0", "scaling.gpus_per_worker=1", *args.set])
            print(f"{method}: best settings of {args.from_sweep} from {trial_cfg}", flush=True)
        m = run_trial(cfg)
        print(json.dumps({k: m.get(k) for k in METRIC_KEYS}), flush=True)


def report(args, work: Path, model_dir: Path, data: Path) -> None:
    from duetto.config import load_config
    from duetto.workflows.report import ReportConfig, build_report

    tag = args.trials
    cfg = load_config(ReportConfig, "configs/report_study.yaml", [
        f"baseline={model_dir}", f"qlora={work}/qlora_{tag}", f"galore={work}/galore_{tag}",
        f"test={data}/test.jsonl", f"out={args.out}", *args.set])  # fmt: skip
    r = build_report(cfg, command="duetto report configs/report_study.yaml "
                     f"baseline=<{args.model}> qlora=<qlora_{tag}> galore=<galore_{tag}> test=<data>/test.jsonl "
                     + " ".join(args.set))  # fmt: skip
    for name, s in r["systems"].items():
        print(name, s["bleu4"], s["rougeL"], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["prep", "train", "report"])
    ap.add_argument("--model", choices=["smollm2-135m-instruct", "gemma-3-270m"], default="smollm2-135m-instruct",
                    help="the fetch name of the base model (docs/models.md)")
    ap.add_argument("--gguf", help="the model's GGUF file, e.g. SmolLM2-135M-Instruct.Q4_1.gguf (pinned sha256 is checked)")
    ap.add_argument("--data", help="the prepared split (default WORK/data; made there by prep if missing)")
    ap.add_argument("--shared", help="folder with the three shared data files")
    ap.add_argument("--work", default="/tmp/study")
    ap.add_argument("--out", default="docs/results/study")
    ap.add_argument("--methods", default="qlora,galore")
    ap.add_argument("--from-sweep", help="train: at the best settings of this sweep folder (its best.json, "
                    "also a copy of it alone)")
    ap.add_argument("--trials", choices=["study", "best"], default="study", help="report: which trials")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the trial (train) or report config, e.g. for a CPU smoke run")
    args = ap.parse_args()
    work = Path(args.work)
    model_dir = work / "models" / args.model
    data = Path(args.data) if args.data else work / "data"
    if args.stage in ("prep", "train") and not args.from_sweep:
        prep(args, work, model_dir, data)
    if args.stage == "train":
        train(args, work, model_dir, data)
    elif args.stage == "report":
        report(args, work, model_dir, data)


if __name__ == "__main__":
    main()
