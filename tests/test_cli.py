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
