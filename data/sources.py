"""Readers for the raw instruction-data schemas: find the rows of a source, turn each into examples.

A source is a local file (JSON array, JSON Lines, parquet) or a ``datasets`` dataset (a hub id such as
``tatsu-lab/alpaca``, or a local dataset folder). ``read_rows`` yields one ``Row`` per record with the
place it came from (``FILE:LINE``); ``to_examples`` maps a record of one schema to unified
``Example``s, raising ``RowError`` with a short code and a reason when the record does not fit.
Cleaning, de-duplication and splitting live in unify.py.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

#: the schemas we read; docs/data.md describes each
KINDS = ("alpaca", "tulu", "ultrachat", "sharegpt", "jsonl")

#: the split read from a hub or dataset-folder source when none is given
DEFAULT_SPLIT = {"alpaca": "train", "tulu": "train", "ultrachat": "train_sft", "sharegpt": "train", "jsonl": "train"}

# ShareGPT dumps name speakers inconsistently; these are the spellings seen in the common dumps.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
ROLE_LABEL = {"system": "System", "user": "User", "assistant": "Assistant"}

FILE_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
ACCEPTED_SHAPES = "expected a JSON array of records (in a .json file) or JSON Lines (one object per line)"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SURROGATE = re.compile("[\ud800-\udfff]")
# a JSON string, or one bracket outside strings: enough to find where a nested value ends without recursion
_JSON_WS = re.compile(r"[ \t\r\n]*")
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class DataError(Exception):
    """Input that stops ``prepare``; the message starts with where (``FILE:LINE``) and says why."""

    def __init__(self, where: str, reason: str, code: str = "invalid"):
        self.where, self.reason, self.code = where, reason, code
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # pickling (a Ray worker raising it) rebuilds it from its fields, not the message
        return type(self), (self.where, self.reason, self.code)


class RowError(ValueError):
    """One record that does not fit its schema: ``code`` is the manifest's reason key."""

    def __init__(self, code: str, reason: str):
        self.code, self.reason = code, reason
        super().__init__(reason)

    def __reduce__(self):  # pickling (a Ray worker raising it) rebuilds it from its fields, not the message
        return type(self), (self.code, self.reason)


@dataclass(frozen=True)
class Row:
    """One raw record, or the error that kept it from parsing."""

    where: str  # FILE:LINE, FILE:LINE (array index N), FILE:row N, or DATASET[split]:N
    ref: str  # provenance id used when the record carries none of its own
    raw: str  # the record's original text, for rejected.jsonl
    obj: Any = None
    error: RowError | None = None


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    response: str
    id: str


# ---------------------------------------------------------------------------------------- locating


def resolve(path: str, kind: str) -> tuple[str, str]:
    """(format, location): format is json | jsonl | parquet | hub; raises DataError when not found."""
    if path.startswith("hf:"):
        return "hub", path[3:]
    p = Path(path).expanduser()
    if p.is_dir():  # a local `datasets` folder (data files named by split), read like a hub dataset
        return "hub", str(p)
    if p.is_file():
        fmt = FILE_SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            known = ", ".join(FILE_SUFFIXES)
            raise DataError(path, f"unknown file format {p.suffix or '(no suffix)'!r} (expected one of {known})", "file")
        return fmt, str(p)
    if p.suffix.lower() in FILE_SUFFIXES or path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        raise DataError(path, f"file not found (relative paths resolve against the current directory, {Path.cwd()})", "file")
    return "hub", path


def read_rows(path: str, kind: str, split: str = "", limit: int | None = None) -> Iterator[Row]:
    """Every record of a source, in file order; file-level problems raise DataError."""
    fmt, location = resolve(path, kind)
    readers = {"json": _json_rows, "jsonl": _jsonl_rows, "parquet": _parquet_rows}
    if fmt == "hub":
        rows = _hub_rows(location, split or DEFAULT_SPLIT[kind])
    else:
        rows = readers[fmt](Path(location))
    escaped = _SURROGATE.search(location) is not None  # a file name that is not UTF-8
    for n, row in enumerate(rows):
        if limit is not None and n >= limit:
            return
        if escaped:  # ids and places show its bytes as \xNN, so they can be written as UTF-8
            row = replace(row, where=_shown(row.where), ref=_shown(row.ref))
        # a surrogate reaches a record only as a \\u escape in JSON text, or as itself
        if row.error is None and ("\\u" in row.raw or _SURROGATE.search(row.raw)):
            error = lone_surrogate(row.obj)
            if error is not None:
                row = replace(row, raw=row.raw.encode("utf-8", "backslashreplace").decode("utf-8"), error=error)
        yield row


def _shown(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def lone_surrogate(obj: Any) -> RowError | None:
    """The first string (key or value) holding half of a UTF-16 surrogate pair, which UTF-8 cannot encode."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:  # a loop, not recursion: records can nest as deep as the JSON parser allows
        at, v = stack.pop()
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                reason = f"lone UTF-16 surrogate {m.group()!r} at character {m.start() + 1} (not Unicode text; UTF-8 cannot encode it)"
                return RowError("lone_surrogate", f"{at or 'the record'}: {reason}")
        elif isinstance(v, dict):  # keys are checked (popped) before the paths they name are used
            stack.extend(reversed([(f"{at}.{k}" if at else k, x) for k, x in v.items()]))
            stack.extend((f"a key of {at or 'the record'}", k) for k in v)
        elif isinstance(v, list):
            stack.extend(reversed([(f"{at}[{i}]", x) for i, x in enumerate(v)]))
    return None


def parse_error(e: Exception) -> RowError:
    """What json raised for one record, as a row error (json raises more than JSONDecodeError)."""
    if isinstance(e, RecursionError):
        return RowError("too_deep", f"JSON nested too deeply to read (more than about {sys.getrecursionlimit()} levels)")
    if isinstance(e, json.JSONDecodeError):
        return RowError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
    return RowError("invalid_json", f"invalid JSON: {e}")  # e.g. an integer of more than 4300 digits


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}", f"not UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start})", "invalid_utf8") from None


def _json_rows(path: Path) -> Iterator[Row]:
    data = path.read_bytes()
    text = _decode(path, data).lstrip("\ufeff")
    if not text.strip():
        raise DataError(f"{path}:1", "empty file (no rows)", "empty_file")
    if text.lstrip()[0] == "{":  # many *.json files are really JSON Lines
        yield from _jsonl_rows(path)
        return
    if text.lstrip()[0] != "[":
        raise DataError(f"{path}:1", f"the file starts with {text.lstrip()[0]!r}; {ACCEPTED_SHAPES}", "file")
    # raw_decode element by element, so each record keeps its line and a bad one is named exactly
    decoder = json.JSONDecoder()
    line, line_pos, index = 1, 0, 0

    def skip_ws(p: int) -> int:
        return _JSON_WS.match(text, p).end()

    def line_of(p: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, p)
        line_pos = p
        return line

    pos = skip_ws(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        raise DataError(f"{path}:{line_of(pos)}", "empty file (the JSON array has no elements)", "empty_file")
    while True:
        pos = skip_ws(pos)
        start_line = line_of(pos)
        where, ref = f"{path}:{start_line} (array index {index})", f"{path.name}:{start_line}"
        try:
            obj, end = decoder.raw_decode(text, pos)
            row = Row(where, ref, text[pos:end], obj)
        except json.JSONDecodeError as e:
            # a syntax error inside an array hides where the next element starts: stop, even under skip
            reason = f"invalid JSON in array index {index}: {e.msg} (column {e.colno})"
            raise DataError(f"{path}:{e.lineno}", reason, "invalid_json") from None
        except (RecursionError, ValueError) as e:  # too deep or too big to read: set it aside, go on after it
            error, end = parse_error(e), _value_end(text, pos)
            if end is None:
                raise DataError(where, error.reason, error.code) from None
            row = Row(where, ref, text[pos:end], error=error)
        yield row
        index += 1
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                raise DataError(f"{path}:{line_of(pos)}", "text after the end of the JSON array", "invalid_json")
            return
        reason = f"invalid JSON: expected ',' or ']' after array index {index - 1}"
        raise DataError(f"{path}:{line_of(pos)}", reason, "invalid_json")


def _value_end(text: str, pos: int) -> int | None:
    """Where the array or object that starts at ``pos`` ends, by counting brackets outside strings."""
    depth = 0
    for m in _JSON_TOKEN.finditer(text, pos):
        if m.group() in ("[", "{"):
            depth += 1
        elif m.group() in ("]", "}"):
            depth -= 1
            if depth == 0:
                return m.end()
    return None


def _refuse_multiline_value(path: Path, data: bytes) -> None:
    """A file whose first record spans several lines is pretty-printed JSON, not JSON Lines: say so."""
    text = data.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip())
    try:
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except (RecursionError, ValueError):
        return  # not one readable value either: the first line's own error says more
    first, last = text.count("\n", 0, start) + 1, text.count("\n", 0, end) + 1
    if last > first:
        what = "a single JSON object" if isinstance(obj, dict) else f"a single JSON value ({_type(obj)})"
        more = ", then more text" if text[end:].strip() else ""
        raise DataError(f"{path}:{first}", f"{what} spanning lines {first}-{last}{more}; {ACCEPTED_SHAPES}", "file")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise DataError(f"{path}:1", "empty file (no rows)", "empty_file")
    records = 0
    for lineno, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue  # blank lines (the final newline, separators) are not records
        where, ref = f"{path}:{lineno}", f"{path.name}:{lineno}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"not UTF-8 (byte 0x{raw_line[e.start]:02x} at column {e.start + 1})"
            yield Row(where, ref, raw_line.decode("utf-8", "backslashreplace"), error=RowError("invalid_utf8", reason))
            continue
        try:
            obj, error = json.loads(line), None
        except (RecursionError, ValueError) as e:
            if records == 0 and isinstance(e, json.JSONDecodeError):
                _refuse_multiline_value(path, data)
            obj, error = None, parse_error(e)
        records += 1
        yield Row(where, ref, line, obj, error)


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        raise DataError(str(path), f"not a readable parquet file: {e}", "file") from None
    if table.num_rows == 0:
        raise DataError(str(path), "empty file (the parquet table has no rows)", "empty_file")
    for n, obj in enumerate(table.to_pylist(), start=1):
        yield Row(f"{path}:row {n}", f"{path.name}:row {n}", json.dumps(obj, ensure_ascii=False, default=str), obj)


def _hub_rows(dataset: str, split: str) -> Iterator[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(dataset, "reading a hub dataset needs the `datasets` package (pip install datasets)", "file") from None
    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as e:  # network, auth, unknown split: all end here, with the library's message
        raise DataError(f"{dataset}[{split}]", f"could not load the dataset: {type(e).__name__}: {e}", "file") from None
    if len(ds) == 0:
        raise DataError(f"{dataset}[{split}]", "empty dataset split (no rows)", "empty_file")
    name = dataset.rstrip("/").split("/")[-1] if Path(dataset).is_dir() else dataset
    for n, obj in enumerate(ds):
        yield Row(f"{dataset}[{split}]:{n}", f"{name}:{split}:{n}", json.dumps(obj, ensure_ascii=False, default=str), obj)


# ---------------------------------------------------------------------------------------- schemas


def to_examples(kind: str, obj: Any, ref: str, multi_turn: str = "first") -> list[Example]:
    """One record of schema ``kind`` -> its examples (one, or one per assistant turn under ``all``)."""
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {_type(obj)}")
    if kind == "jsonl":
        rec = unified_record(obj)
        return [Example(rec["instruction"], rec["input"], rec["response"], rec.get("id") or ref)]
    if kind == "alpaca":
        return [Example(_text(obj, "instruction"), _text(obj, "input", required=False), _text(obj, "output"), _ref(obj, "id", ref))]
    if kind in ("tulu", "ultrachat"):
        turns = _turns(obj, "messages", "role", "content", CHAT_ROLES)
        return _pairs(turns, _ref(obj, "prompt_id" if kind == "ultrachat" else "id", ref), multi_turn)
    if kind == "sharegpt":
        turns = _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES)
        return _pairs(turns, _ref(obj, "id", ref), multi_turn)
    raise ValueError(f"unknown source kind {kind!r}")  # configs are validated before we get here


def unified_record(obj: Any) -> dict[str, str]:
    """A record of the unified schema -> ``{instruction, input, response}``, plus ``source``/``id`` when present.

    Every reader of unified files checks rows here (``prepare --source jsonl=``, ``read_jsonl``): a
    missing or null ``input`` is ""; an integer ``id`` is kept as text; other keys are ignored.
    """
    if not isinstance(obj, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {_type(obj)}")
    rec = {"instruction": _text(obj, "instruction"), "input": _text(obj, "input", required=False), "response": _text(obj, "response")}
    for key in ("source", "id"):
        if obj.get(key) is not None:
            rec[key] = str(obj[key]) if key == "id" and type(obj[key]) is int else _text(obj, key)
    return rec


def _type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )


def _text(obj: dict, key: str, required: bool = True) -> str:
    if key not in obj or (obj[key] is None and not required):
        if required:
            raise RowError("missing_field", f"missing field {key!r}")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise RowError("wrong_type", f"field {key!r} must be a string, got {_type(v)}")
    return v


def _ref(obj: dict, key: str, fallback: str) -> str:
    v = obj.get(key)
    return str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) else fallback


def _turns(obj: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[tuple[str, str]]:
    if key not in obj:
        raise RowError("missing_field", f"missing field {key!r}")
    msgs = obj[key]
    if not isinstance(msgs, list):
        raise RowError("wrong_type", f"field {key!r} must be an array of messages, got {_type(msgs)}")
    turns = []
    for i, m in enumerate(msgs):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{at} must be an object, got {_type(m)}")
        for k in (role_key, content_key):
            if k not in m:
                raise RowError("missing_field", f"{at}: missing field {k!r}")
            if not isinstance(m[k], str):
                raise RowError("wrong_type", f"{at}.{k} must be a string, got {_type(m[k])}")
        role = roles.get(m[role_key].strip().lower())
        if role is None:
            known = ", ".join(sorted(roles))
            raise RowError("unknown_role", f"{at}.{role_key}: unknown role {m[role_key]!r} (known: {known})")
        turns.append((role, m[content_key]))
    return turns


def _pairs(turns: list[tuple[str, str]], ref: str, multi_turn: str) -> list[Example]:
    """System turns (only at the start), then user/assistant alternating, starting with user."""
    if not any(role == "assistant" for role, _ in turns):
        raise RowError("no_assistant_turn", f"conversation has no assistant turn ({len(turns)} messages)")
    i = 0
    while i < len(turns) and turns[i][0] == "system":
        i += 1
    pairs: list[tuple[int, int]] = []  # (user turn, assistant turn answering it)
    expected = "user"
    for j in range(i, len(turns)):
        role = turns[j][0]
        if role != expected:
            raise RowError(
                "bad_turn_order",
                f"message {j} is a {role!r} turn where a {expected!r} turn was expected "
                "(system turns first, then user/assistant alternating)",
            )
        if role == "assistant":
            pairs.append((j - 1, j))
        expected = "assistant" if role == "user" else "user"
    # a trailing user turn has no answer to learn from: it yields no example
    examples = [
        Example(turns[u][1], render_history(turns[:u]), turns[a][1], f"{ref}#{n}") for n, (u, a) in enumerate(pairs, start=1)
    ]
    if multi_turn == "first" or len(examples) == 1:
        return [replace(examples[0], id=ref)]
    return examples


def render_history(turns: list[tuple[str, str]]) -> str:
    """Earlier turns as the ``input`` of an example: ``Role: text`` blocks separated by a blank line."""
    return "\n\n".join(f"{ROLE_LABEL[role]}: {content.strip()}" for role, content in turns)
