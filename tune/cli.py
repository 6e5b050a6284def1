"""`duetto sweep`: run a sweep file, resume a stopped sweep, or rebuild a sweep's results.

    duetto sweep run configs/sweep_tiny.yaml [key=value ...]   new sweep (starts a local Ray or joins one)
    duetto sweep resume duetto-runs/sweeps/tiny                 finish a sweep whose driver died
    duetto sweep report duetto-runs/sweeps/tiny                 rewrite results.csv/.md, best.json, pareto.png

`duetto sweep FILE ...` and `duetto sweep --resume DIR` still mean `run` and `resume`.
Exit status: 0 when every trial completed or was stopped early by ASHA, 1 when any trial failed for
good (the results still list it, with its error), 2 for a bad sweep file.
"""

from __future__ import annotations

import argparse

ACTIONS = ("run", "resume", "report")


def legacy_argv(argv: list[str]) -> list[str]:
    """`duetto sweep FILE ...` -> `run FILE ...`; `duetto sweep ... --resume DIR ...` -> `resume DIR ...`."""
    if argv and argv[0] in (*ACTIONS, "-h", "--help"):
        return argv
    if "--resume" in argv:
        i = argv.index("--resume")
        return ["resume", *argv[i + 1 : i + 2], *argv[:i], *argv[i + 2 :]]
    return ["run", *argv]


def _ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (e.g. auto, or ray://host:10001); default: RAY_ADDRESS, else a local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this command starts (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray this command starts (default: all)")


def configure(parser: argparse.ArgumentParser) -> None:
    from duetto.config import add_config_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    sub = parser.add_subparsers(dest="sweep_action", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run a sweep file (the default action)", description="Run a sweep file with Ray Tune.")
    add_config_arguments(run, "configs/sweep_study.yaml; overrides e.g. num_samples=2 base.max_steps=100")
    run.add_argument("--dry-run", action="store_true", help="check the sweep file and print what would run; start nothing")
    _ray_flags(run)
    resume = sub.add_parser("resume", help="finish a stopped sweep (Tuner.restore)",
                            description="Finish the sweep in SWEEP_DIR; its sweep file and overrides are saved there.")  # fmt: skip
    resume.add_argument("sweep_dir", metavar="SWEEP_DIR")
    resume.add_argument("--retry-errored", action="store_true", help="also re-run trials that had failed")
    _ray_flags(resume)
    report = sub.add_parser("report", help="rewrite a sweep's results.csv/.md, best.json, pareto.png",
                            description="Rebuild the results of the sweep in SWEEP_DIR from its trial folders.")  # fmt: skip
    report.add_argument("sweep_dir", metavar="SWEEP_DIR")


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

    if args.sweep_action == "report":
        return _finish(args.sweep_dir)
    ray_args = {"address": args.address, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    if args.sweep_action == "resume":
        from duetto.tune.sweep import resume_sweep

        return _finish(resume_sweep(args.sweep_dir, retry_errored=args.retry_errored, **ray_args))
    from duetto.tune.spec import SweepConfig, load_sweep, space_keys, total_trials

    if args.help_config:
        print(format_help(SweepConfig))
        return 0
    if not args.config:
        raise ConfigError("give a sweep file (e.g. duetto sweep run configs/sweep_tiny.yaml)")
    if "=" in args.config:
        raise ConfigError(f"{args.config!r} is an override; the sweep file comes first (duetto sweep run FILE key=value ...)")
    sweep = load_sweep(args.config, list(args.overrides))
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
