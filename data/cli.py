"""``duetto data prepare`` (raw sources -> train/test JSONL + manifest) and ``duetto data stats``.

Settings come from a DataConfig: defaults, then ``--config`` YAML, then the flags, then ``key=value``
overrides, all through ``duetto.config.load_config``; the named flags are generated from DataConfig.
``--source`` flags replace the YAML's source list. Only the standard library and the light config
and data modules load when the parser is built.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

KIND_HELP = "alpaca | tulu | ultrachat | sharegpt | jsonl"
#: how `stats` counts rows that carry no `source` (hand-made files need not)
NO_SOURCE = "(no source)"
#: DataConfig fields that get a named flag of `prepare` (help and default come from the dataclass)
FLAGS = ["out", "train_size", "test_size", "seed", "on_error", "multi_turn", "max_chars"]


def configure(parser: argparse.ArgumentParser) -> None:
    from duetto.config import add_config_flags
    from duetto.data.unify import DataConfig

    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    p = sub.add_parser(
        "prepare",
        help="read sources, clean, de-duplicate, split; write train.jsonl, test.jsonl, dropped.jsonl, manifest.json",
        description="Read the sources, clean and de-duplicate them, shuffle with the seed and write "
        "DIR/train.jsonl, DIR/test.jsonl, DIR/dropped.jsonl (each dropped example and why) and "
        "DIR/manifest.json (docs/data.md).",
    )
    p.add_argument("--config", metavar="YAML", help="a DataConfig YAML (e.g. configs/data_shared.yaml)")
    p.add_argument("--source", action="append", metavar="KIND=PATH",
                   help=f"a source: KIND ({KIND_HELP}) = a .json/.jsonl/.parquet file, a local datasets folder or a "
                   "hub dataset id; NAME:KIND=PATH labels it NAME. Repeat for several, earliest first in priority. "
                   "Replaces the sources of --config.")
    add_config_flags(p, DataConfig, FLAGS)
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    s = sub.add_parser("stats", help="check files against the unified schema and count rows per source")
    s.add_argument("files", nargs="+", metavar="FILE")
    parser.set_defaults(_data_parser=parser)


def parse_source(text: str) -> dict[str, Any]:
    """``KIND=PATH`` or ``NAME:KIND=PATH`` -> a SourceConfig mapping."""
    from duetto.config import ConfigError
    from duetto.data.sources import KINDS

    if "=" not in text:
        raise ConfigError(f"--source {text!r}: expected KIND=PATH, e.g. alpaca=../shared/data/alpaca_en_demo.json")
    head, path = text.split("=", 1)
    name, _, kind = head.rpartition(":")
    if kind not in KINDS:
        raise ConfigError(f"--source {text!r}: unknown source kind {kind!r} (known: {', '.join(KINDS)})")
    spec: dict[str, Any] = {"kind": kind, "path": path}
    if name:
        spec["name"] = name
    return spec


def build_config(args: argparse.Namespace):
    from duetto.config import config_flags, load_config
    from duetto.data.unify import DataConfig

    flags = config_flags(args)
    if args.source:
        flags["sources"] = [parse_source(s) for s in args.source]
    return load_config(DataConfig, args.config, list(args.overrides), flags=flags)


def run(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        return _prepare(args)
    if args.data_command == "stats":
        return _stats(args)
    args._data_parser.print_help()
    return 2


def _prepare(args: argparse.Namespace) -> int:
    from duetto.config import format_help
    from duetto.data.sources import DataError
    from duetto.data.unify import DataConfig, prepare

    if args.help_config:
        print(format_help(DataConfig))
        return 0
    config = build_config(args)
    try:
        manifest = prepare(config)
    except DataError as e:
        print(f"duetto data prepare: error: {e}", file=sys.stderr)
        if config.on_error == "fail" and e.code not in ("file", "empty_file", "empty"):
            print("  (rerun with --on-error skip to set bad records aside in rejected.jsonl and go on)", file=sys.stderr)
        return 1
    print(f"{'source':<12} {'read':>7} {'kept':>7} {'train':>7} {'test':>7}  dropped")
    for label, info in manifest["sources"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in info["dropped"].items()) or "-"
        print(f"{label:<12} {info['rows_read']:>7} {info['kept']:>7} {info['train']:>7} {info['test']:>7}  {dropped}")
    outs = ", ".join(f"{name} ({o['rows']})" for name, o in manifest["outputs"].items())
    print(f"wrote {config.out}/: {outs}, manifest.json (pool {manifest['pool']}, unused {manifest['unused']})")
    if manifest["outputs"]["dropped.jsonl"]["rows"]:
        print(f"each example dropped in cleaning (empty, too long, duplicate) is listed in {config.out}/dropped.jsonl")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from duetto.data.sources import DataError
    from duetto.data.unify import read_jsonl

    status = 0
    for path in args.files:
        try:
            records = read_jsonl(path)
        except DataError as e:
            print(f"duetto data stats: error: {e}", file=sys.stderr)
            status = 1
            continue
        by_source = Counter(r.get("source", NO_SOURCE) for r in records)
        parts = ", ".join(f"{k} {v}" for k, v in sorted(by_source.items()))
        print(f"{path}: {len(records)} rows ({parts or 'empty'})")
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m duetto.data.cli ...``: the same as ``duetto data ...`` without the other stages."""
    from duetto.config import ConfigError

    parser = argparse.ArgumentParser(prog="duetto data", description="prepare unified JSONL train/test splits")
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"duetto data: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
