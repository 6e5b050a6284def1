"""`duetto train CONFIG.yaml [key=value ...]`: one trial on Ray Train (local Ray, or the cluster)."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    from duetto.config import add_config_arguments

    add_config_arguments(parser, "configs/qlora_study.yaml; overrides e.g. qlora.bits=4 max_steps=50")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run already in output_dir (same settings), or report it again if it finished")  # fmt: skip
    again.add_argument("--overwrite", action="store_true", help="delete the run already in output_dir and train anew")


def run(args: argparse.Namespace) -> int:
    from duetto.config import config_from_arguments, to_dict
    from duetto.trainers.config import TrialConfig

    cfg = config_from_arguments(TrialConfig, args)
    if cfg is None:
        return 0
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    from duetto.trainers.trial import run_trial

    metrics = run_trial(cfg, resume=args.resume, overwrite=args.overwrite)
    keys = ("method", "train_loss", "eval_loss", "bleu4", "rougeL", "peak_memory_bytes", "tokens_per_second", "wall_seconds")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    print(f"saved: {metrics.get('model_dir')}")
    return 0
