"""The console script: its subcommand table matches the parser, and --help is fast."""

from __future__ import annotations

import argparse
import subprocess
import sys

from duetto.cli import COMMANDS, build_parser


def test_table_matches_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    for name, (module, help_text) in COMMANDS.items():
        assert sub.choices[name].description == help_text
        assert module.startswith("duetto.")


def test_help_imports_nothing_heavy():
    """What keeps `duetto --help` fast (measured in the README): no heavy import on the way."""
    code = (
        "import sys, time; t=time.perf_counter(); from duetto.cli import build_parser; build_parser();"
        "heavy=[m for m in ('torch','transformers','ray','bitsandbytes','peft') if m in sys.modules];"
        "print(heavy, time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, _ = out.rsplit("]", 1)
    assert heavy.strip() == "[", f"heavy modules imported while building the parser: {out}"
    proc = subprocess.run([sys.executable, "-m", "duetto", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout


def test_no_command_prints_help_and_fails():
    proc = subprocess.run([sys.executable, "-m", "duetto"], capture_output=True, text=True)
    assert proc.returncode == 2 and "COMMAND" in proc.stdout


def test_actions_and_the_spellings_users_already_type():
    from duetto.cli import parse_args

    def action(*argv):
        args = parse_args(list(argv))
        return args.sweep_action if argv[0] == "sweep" else args.serve_action

    assert action("sweep", "run", "configs/sweep_tiny.yaml", "num_samples=1") == "run"
    old = parse_args(["sweep", "configs/sweep_tiny.yaml", "num_samples=1"])
    assert (old.sweep_action, old.config, old.overrides) == ("run", "configs/sweep_tiny.yaml", ["num_samples=1"])
    old = parse_args(["sweep", "--resume", "runs/s", "--retry-errored"])
    assert (old.sweep_action, old.sweep_dir, old.retry_errored) == ("resume", "runs/s", True)
    assert parse_args(["sweep", "resume", "runs/s"]).sweep_dir == "runs/s"
    assert parse_args(["sweep", "report", "runs/s"]).sweep_dir == "runs/s"
    assert action("serve", "--generator", "g") == "run" and action("serve", "configs/serve.yaml") == "run"
    assert action("serve", "bench", "--duration", "1") == "bench"
