"""Raw sources -> one cleaned, de-duplicated, shuffled train/test split in the unified JSONL schema.

``prepare(DataConfig)`` reads every source (sources.py), strips and filters the examples, drops
duplicates across sources (first occurrence in source order wins), shuffles with the seed, splits,
and writes ``train.jsonl``, ``test.jsonl``, ``dropped.jsonl`` (each example cleaning dropped, and
why), ``rejected.jsonl`` under ``on_error: skip``, and ``manifest.json`` last, each through a temp
file and a rename. ``read_jsonl`` reads unified files back for the later stages, with the schema
check of the ``jsonl`` source kind. docs/data.md is the user-facing description of every rule here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from duetto.config import ConfigError, to_dict
from duetto.files import file_sha256
from duetto.data.sources import DEFAULT_SPLIT, KINDS, DataError, Example, RowError, read_rows, resolve, to_examples, unified_record

SourceKind = Literal["alpaca", "tulu", "ultrachat", "sharegpt", "jsonl"]
assert set(SourceKind.__args__) == set(KINDS)  # type: ignore[attr-defined]


@dataclass
class SourceConfig:
    kind: SourceKind
    """the source's schema: alpaca | tulu | ultrachat | sharegpt | jsonl (already unified)"""
    path: str
    """a .json/.jsonl/.parquet file (relative paths resolve against the current directory), a local
    `datasets` folder, or a Hugging Face dataset id such as tatsu-lab/alpaca (prefix hf: to force the hub)"""
    name: str = ""
    """the label in `source` and in the manifest; empty means the kind"""
    split: str = ""
    """the dataset split for hub/folder sources; empty means the kind's default (train, or train_sft for ultrachat)"""
    limit: int | None = None
    """read at most this many records (the first ones, in file order); null reads all"""

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """the sources, in priority order: when two hold the same example, the earlier source keeps it"""
    out: str = "duetto-runs/data"
    """output folder for train.jsonl, test.jsonl, dropped.jsonl, manifest.json (and rejected.jsonl)"""
    train_size: int = 5000
    """training examples wanted; fewer are written (with a warning) when the data runs short"""
    test_size: int = 2000
    """test examples wanted; taken first from the shuffled pool, so they do not depend on train_size"""
    seed: int = 0
    """seed of the shuffle that picks and orders the split"""
    on_error: Literal["fail", "skip"] = "fail"
    """bad records: fail stops naming FILE:LINE; skip writes them to rejected.jsonl and counts them"""
    multi_turn: Literal["first", "all"] = "first"
    """first: the first user turn and its answer; all: one example per assistant turn, history as input"""
    max_chars: int | None = None
    """drop examples whose instruction+input+response exceed this many characters (reason too_long); null keeps all"""

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources: at least one source is needed (e.g. --source alpaca=PATH)")
        for label, n in Counter(s.label for s in self.sources).items():
            if n > 1:
                raise ConfigError(f"sources: {n} sources are labelled {label!r}; give them distinct `name`s")
        for i, s in enumerate(self.sources):
            if not s.path:
                raise ConfigError(f"sources[{i}].path: empty")
            if s.limit is not None and s.limit < 1:
                raise ConfigError(f"sources[{i}].limit: must be at least 1, got {s.limit}")
        if self.train_size < 1:
            raise ConfigError(f"train_size: must be at least 1, got {self.train_size}")
        if self.test_size < 0:
            raise ConfigError(f"test_size: must be 0 or more, got {self.test_size}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ConfigError(f"max_chars: must be at least 1 (or null), got {self.max_chars}")


# ---------------------------------------------------------------------------------------- cleaning


def clean(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def exact_key(ex: Example) -> bytes:
    return hashlib.blake2b(json.dumps([ex.instruction, ex.input, ex.response]).encode(), digest_size=16).digest()


def prompt_key(ex: Example) -> bytes:
    """The prompt (instruction then input) with all whitespace removed and case folded.

    Copies of a prompt join ``instruction`` and ``input`` with nothing (UltraChat's copies of Alpaca),
    a space or a newline, and re-space or re-case it; removing whitespace makes them all one key.
    The response is left out: one prompt with two answers teaches conflicting targets, and across
    the split it would put a test prompt into training.
    """
    text = "".join((ex.instruction + ex.input).split()).casefold()
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def drop_reason(ex: Example, max_chars: int | None) -> str | None:
    if not ex.instruction:
        return "empty_instruction"
    if not ex.response:
        return "empty_response"
    if max_chars is not None and len(ex.instruction) + len(ex.input) + len(ex.response) > max_chars:
        return "too_long"
    return None


# ---------------------------------------------------------------------------------------- prepare


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def prepare(config: DataConfig, log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Build the split described by ``config``; returns the manifest (also written to out/manifest.json).

    Raises DataError (message ``FILE:LINE: reason``) on bad input under ``on_error: fail``, on
    file-level problems under either mode, and when no example survives cleaning.
    """
    config.validate()
    pool: list[dict[str, str]] = []
    rejected: list[dict[str, Any]] = []
    dropped_rows: list[dict[str, Any]] = []
    # key -> the kept example it came from, {source, id}: a duplicate names the row it repeats
    seen_exact: dict[bytes, dict[str, str]] = {}
    seen_prompt: dict[bytes, dict[str, str]] = {}
    per_source: dict[str, dict[str, Any]] = {}

    for src in config.sources:
        fmt, location = resolve(src.path, src.kind)
        info: dict[str, Any] = {"kind": src.kind, "path": src.path, "format": fmt}
        if fmt == "hub":
            info["split"] = src.split or DEFAULT_SPLIT[src.kind]
        else:
            info["sha256"] = file_sha256(location)
        rows = examples = kept = 0
        dropped: Counter[str] = Counter()
        duplicate_of: Counter[str] = Counter()
        for row in read_rows(src.path, src.kind, src.split, src.limit):
            rows += 1
            error = row.error
            if error is None:
                try:
                    found = to_examples(src.kind, row.obj, row.ref, config.multi_turn)
                except RowError as e:
                    error = e
            if error is not None:
                if config.on_error == "fail":
                    raise DataError(row.where, error.reason, error.code)
                examples += 1  # a rejected record counts as one example dropped for its reason
                dropped[error.code] += 1
                rejected.append(
                    {"source": src.label, "where": row.where, "reason": error.code, "message": error.reason, "raw": row.raw}
                )
                continue
            for ex in found:
                examples += 1
                ex = Example(clean(ex.instruction), clean(ex.input), clean(ex.response), ex.id)
                reason, first = drop_reason(ex, config.max_chars), None
                if reason is None:
                    ek, pk = exact_key(ex), prompt_key(ex)
                    first = seen_exact.get(ek) or seen_prompt.get(pk)
                    if first is not None:
                        reason = "duplicate_exact" if ek in seen_exact else "duplicate_prompt"
                        duplicate_of[first["source"]] += 1
                    else:
                        seen_exact[ek] = seen_prompt[pk] = {"source": src.label, "id": ex.id}
                if reason is not None:
                    dropped[reason] += 1
                    entry = {"source": src.label, "id": ex.id, "where": row.where, "reason": reason}
                    dropped_rows.append(entry if first is None else {**entry, "duplicate_of": first})
                    continue
                kept += 1
                record = {"instruction": ex.instruction, "input": ex.input, "response": ex.response}
                pool.append({**record, "source": src.label, "id": ex.id})
        info.update(rows_read=rows, examples=examples, kept=kept, dropped=dict(sorted(dropped.items())),
                    duplicate_of=dict(sorted(duplicate_of.items())))
        per_source[src.label] = info

    if not pool:
        raise DataError("sources", "no examples left after cleaning (see the dropped counts); nothing written", "empty")

    notes: list[str] = []
    test_n, train_n = split_sizes(len(pool), config.train_size, config.test_size, notes)
    for note in notes:
        log(f"warning: {note}")
    random.Random(config.seed).shuffle(pool)
    test, train = pool[:test_n], pool[test_n : test_n + train_n]
    for label, info in per_source.items():
        info["train"] = sum(r["source"] == label for r in train)
        info["test"] = sum(r["source"] == label for r in test)

    from duetto import __version__

    totals = sum((Counter(info["dropped"]) for info in per_source.values()), Counter())
    manifest: dict[str, Any] = {
        "tool": f"duetto {__version__}",
        "config": to_dict(config),
        "seed": config.seed,
        "multi_turn": config.multi_turn,
        "on_error": config.on_error,
        "sources": per_source,
        "dropped": dict(sorted(totals.items())),
        "pool": len(pool),
        "requested": {"train": config.train_size, "test": config.test_size},
        "sizes": {"train": len(train), "test": len(test)},
        "unused": len(pool) - len(train) - len(test),
        "notes": notes,
    }
    files = {"train.jsonl": train, "test.jsonl": test, "dropped.jsonl": dropped_rows}
    if config.on_error == "skip":
        files["rejected.jsonl"] = rejected
    manifest["outputs"] = write_outputs(Path(config.out), files, manifest)
    return manifest


def split_sizes(n: int, train_size: int, test_size: int, notes: list[str]) -> tuple[int, int]:
    """(test, train) counts from a pool of n; short pools keep the requested test share."""
    wanted = train_size + test_size
    if n >= wanted:
        return test_size, train_size
    test_n = int(n * test_size / wanted + 0.5)
    if test_size > 0 and n >= 2:
        test_n = min(max(test_n, 1), n - 1)
    train_n = n - test_n
    notes.append(
        f"only {n} examples after cleaning, fewer than the {wanted} requested "
        f"(train {train_size} + test {test_size}): wrote train {train_n} / test {test_n}, "
        f"keeping the requested test share {test_size}/{wanted}"
    )
    return test_n, train_n


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(out: Path, files: dict[str, list[dict[str, Any]]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write each file through a temp file and a rename; the manifest goes last.

    The old manifest is removed first, so a run that dies half-way leaves a folder with no manifest
    rather than new files vouched for by an old one.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    if "rejected.jsonl" not in files:
        (out / "rejected.jsonl").unlink(missing_ok=True)  # left by an earlier skip run, not this one
    outputs = {}
    for name, records in files.items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        _atomic_write(out / name, data)
        outputs[name] = {"rows": len(records), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["outputs"] = outputs
    # a path that is not UTF-8 holds Python's surrogate escapes: as \udcNN they read back as the same path
    _atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
    return outputs


# ---------------------------------------------------------------------------------------- reading back


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """A file in the unified schema (train.jsonl / test.jsonl, or any file ``prepare`` reads as
    ``jsonl``) -> its records; an empty file has none.

    Every row passes ``unified_record`` (sources.py), the check ``prepare --source jsonl=`` makes:
    ``input`` may be absent (read as ""), ``source`` and ``id`` are kept when present, other keys are
    dropped. Raises DataError naming ``FILE:LINE`` and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found", "file")
    records = []
    try:
        for row in read_rows(str(path), "jsonl"):
            try:
                if row.error is not None:
                    raise row.error
                records.append(unified_record(row.obj))
            except RowError as e:
                raise DataError(row.where, e.reason, e.code) from None
    except DataError as e:
        if e.code != "empty_file":
            raise
    return records
