"""`duetto sweep`: run a sweep file, resume a stopped sweep, or rebuild a sweep's results.

    duetto sweep configs/sweep_tiny.yaml [key=value ...]   new sweep (starts a local Ray or joins one)
    duetto sweep --resume duetto-runs/sweeps/tiny           finish a sweep whose driver died
    duetto sweep report duetto-runs/sweeps/tiny             rewrite results.csv/.md, best.json, pareto.png

Exit status: 0 when every trial completed or was stopped early by ASHA, 1 when any trial failed for
good (the results still list it, with its error), 2 for a bad sweep file.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("config", nargs="?", help="sweep YAML (e.g. configs/sweep_study.yaml), or `report`")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. num_samples=2 base.max_steps=100; after `report`: the sweep folder")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="finish the sweep in this folder (Tuner.restore)")
    parser.add_argument("--retry-errored", action="store_true", help="with --resume: also re-run trials that had failed")
    parser.add_argument("--address", help="Ray cluster to join (e.g. auto, or ray://host:10001); default: RAY_ADDRESS, else a local Ray")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this command starts (default: all)")
    parser.add_argument("--num-gpus", type=int, help="GPUs of the local Ray this command starts (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="check the sweep file and print what would run; start nothing")
    parser.add_argument("--help-config", action="store_true", help="list every sweep key with its default and meaning")


def _print_summary(summary: dict) -> None:
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(summary["statuses"].items()))
    print(f"duetto sweep: {summary['trials']} trials: {statuses}")
    for method, row in sorted(summary["best"].items()):
        print(f"  best {method}: {row['trial']} {summary['metric']}={row[summary['metric']]:.4g} model {row['model_dir']}")
    for row in summary["rows"]:
        if row["status"] == "error":
            print(f"  FAILED {row['trial']}: {row['error']} ({row['trial_dir']}/error.txt)")
    d = summary["sweep_dir"]
    print(f"results: {d}/results.md, {d}/results.csv, {d}/best.json, {d}/pareto.png")


def _finish(sweep_dir) -> int:
    from duetto.tune.results import ERROR, UNFINISHED, write_report

    summary = write_report(sweep_dir)
    _print_summary(summary)
    bad = summary["statuses"].get(ERROR, 0) + summary["statuses"].get(UNFINISHED, 0)
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    from duetto.config import ConfigError, format_help

    from duetto.tune.spec import SweepConfig

    if args.help_config:
        print(format_help(SweepConfig))
        return 0
    ray_args = {"address": args.address, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    if args.config == "report":
        if len(args.overrides) != 1:
            raise ConfigError("usage: duetto sweep report SWEEP_DIR")
        return _finish(args.overrides[0])
    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume takes only the sweep folder: the sweep file and overrides it ran with are saved there")
        from duetto.tune.sweep import resume_sweep

        return _finish(resume_sweep(args.resume, retry_errored=args.retry_errored, **ray_args))
    if not args.config:
        raise ConfigError("give a sweep file (e.g. configs/sweep_tiny.yaml), --resume SWEEP_DIR, or report SWEEP_DIR")
    config, overrides = args.config, list(args.overrides)
    from duetto.tune.spec import load_sweep, space_keys, total_trials

    sweep = load_sweep(config, overrides)
    if args.dry_run:
        import yaml

        from duetto.config import to_dict

        print(yaml.safe_dump(to_dict(sweep), sort_keys=False, default_flow_style=None), end="")
        for method, keys in space_keys(sweep).items():
            print(f"{method}: {sweep.samples_for(method)} sample(s) over {', '.join(keys)}")
        print(f"{total_trials(sweep)} trials -> {sweep.sweep_dir()}")
        return 0
    from duetto.tune.sweep import start_sweep

    return _finish(start_sweep(sweep, **ray_args))
