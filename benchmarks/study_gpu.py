"""The study reproduced on a GPU (issue 7), through the product's own code paths.

Stage `prep`: convert SmolLM2-135M-Instruct from its GGUF and prepare the shared data (seed 0).
Stage `train`: prep, then run the study-config trials (configs/qlora_study.yaml, configs/galore_study.yaml: seq 128, batch 2,
2 epochs, QLoRA int8 r4 a8 lr 2e-5, GaLore layer-wise 8-bit lr 1e-5). Stage `report`: `duetto report
configs/report_study.yaml` on those trials. Each stage skips what is already done, so the two can run
in separate device calls; after one `prep`, `train --methods qlora` and `train --methods galore` can
run at the same time (one GPU each: benchmarks/h200_session.sh).

    python benchmarks/study_gpu.py train  --gguf FILE --shared DIR --work /tmp/study
    python benchmarks/study_gpu.py report --work /tmp/study --out $OUT/study
    # CPU smoke run of the same path: add --set scaling.use_gpu=false --set max_steps=3 (train) and
    # --set num_examples=8 --set bootstrap=50 (report)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["prep", "train", "report"])
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (pinned sha256 is checked)")
    ap.add_argument("--shared", help="folder with the three shared data files")
    ap.add_argument("--work", default="/tmp/study")
    ap.add_argument("--out", default="docs/results/study")
    ap.add_argument("--methods", default="qlora,galore")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of the trial (train) or report config, e.g. for a CPU smoke run")
    args = ap.parse_args()
    work = Path(args.work)
    model_dir = work / "models" / "smollm2-135m-instruct"
    data = work / "data"

    if args.stage in ("prep", "train"):
        from duetto.config import load_config
        from duetto.data.unify import DataConfig, prepare
        from duetto.models import fetch
        from duetto.trainers.config import TrialConfig
        from duetto.trainers.trial import run_trial

        t0 = time.perf_counter()
        fetch("smollm2-135m-instruct", work / "models", gguf=args.gguf)
        print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
        if not (data / "manifest.json").exists():
            shared = Path(args.shared)
            prepare(load_config(DataConfig, "configs/data_shared.yaml", [
                f"sources=[{{kind: alpaca, path: {shared}/alpaca_en_demo.json}}, "
                f"{{kind: tulu, path: {shared}/tulu_v2_sample.jsonl}}, "
                f"{{kind: ultrachat, path: {shared}/ultrachat_sample.jsonl}}]", f"out={data}"]))
        for method in args.methods.split(",") if args.stage == "train" else []:
            out = work / f"{method}_study"
            if (out / "metrics.json").exists():
                continue
            cfg = load_config(TrialConfig, f"configs/{method}_study.yaml", [
                f"model={model_dir}", f"data.train={data}/train.jsonl", f"data.test={data}/test.jsonl",
                f"output_dir={out}", "eval.num_examples=64", "logging_steps=50", "scaling.use_gpu=true", *args.set])
            m = run_trial(cfg)
            print(json.dumps({k: m.get(k) for k in ("method", "train_loss", "eval_loss", "bleu4", "rougeL",
                                                    "peak_memory_bytes", "tokens_per_second", "train_seconds",
                                                    "step")}), flush=True)
    else:
        from duetto.config import load_config
        from duetto.report import ReportConfig, build_report

        cfg = load_config(ReportConfig, "configs/report_study.yaml", [
            f"baseline={model_dir}", f"qlora={work}/qlora_study", f"galore={work}/galore_study",
            f"test={data}/test.jsonl", f"out={args.out}", *args.set])
        r = build_report(cfg, command="duetto report configs/report_study.yaml "
                         "baseline=<smollm2-135m-instruct> qlora=<qlora_study> galore=<galore_study>")
        for name, s in r["systems"].items():
            print(name, s["bleu4"], s["rougeL"], flush=True)


if __name__ == "__main__":
    main()
