"""Input that used to end in a Python traceback: lone surrogates, deep nesting, huge numbers, a
pretty-printed object where records were expected, a file name that is not UTF-8; and the data
stage's exceptions crossing a process boundary (Ray pickles what a worker raises)."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from duetto.data.sources import DataError, RowError
from duetto.data.unify import DataConfig, SourceConfig, prepare, read_jsonl

DEEP = "[" * 200_000 + "]" * 200_000  # one line; json's C parser gives up far sooner

# a good record of each kind (an emoji, written as a surrogate pair escape, must pass) and one with a lone surrogate
GOOD = {
    "alpaca": {"instruction": "Smile \U0001f600", "output": "A"},
    "tulu": {"id": "t1", "messages": [{"role": "user", "content": "Q \U0001f600"}, {"role": "assistant", "content": "A"}]},
    "ultrachat": {"prompt_id": "u1", "messages": [{"role": "user", "content": "Q \U0001f600"}, {"role": "assistant", "content": "A"}]},
    "sharegpt": {"id": "s1", "conversations": [{"from": "human", "value": "Q \U0001f600"}, {"from": "gpt", "value": "A"}]},
    "jsonl": {"instruction": "Q \U0001f600", "response": "A"},
}
LONE = {
    "alpaca": ({"instruction": "Q2", "input": "x\ud800", "output": "B"}, "input"),
    "tulu": ({"id": "t2", "messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B\udc00"}]}, "messages[1].content"),
    "ultrachat": ({"prompt_id": "u2", "messages": [{"role": "user", "content": "\udbff"}, {"role": "assistant", "content": "B"}]}, "messages[0].content"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "\ud800B"}]}, "conversations[1].value"),
    "jsonl": ({"instruction": "Q2", "response": "B", "meta": {"note": "\udfff"}}, "meta.note"),  # even a key we ignore
}


def config(out, kind, path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(kind, str(path))], out=str(out), train_size=1, test_size=0, **kw)


def write(path, records: list) -> None:
    """JSON Lines for .jsonl, an indented JSON array for .json; json.dumps writes a surrogate as its \\u escape."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")


def assert_clean_utf8(path) -> None:
    text = path.read_bytes().decode("utf-8")  # strict: a surrogate written out would not decode
    assert not any("\ud800" <= ch <= "\udfff" for ch in text)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("kind", list(GOOD))
def test_lone_surrogate_is_a_row_error_in_every_kind(tmp_path, kind, suffix):
    bad, field = LONE[kind]
    path = tmp_path / f"src{suffix}"
    write(path, [GOOD[kind], bad])
    with pytest.raises(DataError) as e:
        prepare(config(tmp_path / "o", kind, path), log=lambda _: None)
    starts = [n for n, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"]  # array elements
    where = f"{path}:2" if suffix == ".jsonl" else f"{path}:{starts[1]} (array index 1)"
    assert str(e.value).startswith(f"{where}: {field}: lone UTF-16 surrogate") and e.value.code == "lone_surrogate"

    m = prepare(config(tmp_path / "o", kind, path, on_error="skip"), log=lambda _: None)
    assert m["sources"][kind]["dropped"] == {"lone_surrogate": 1} and m["sources"][kind]["kept"] == 1
    rejected = [json.loads(line) for line in (tmp_path / "o" / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["where"], r["reason"]) for r in rejected] == [(where, "lone_surrogate")]
    for name in ("train.jsonl", "rejected.jsonl", "dropped.jsonl", "manifest.json"):
        assert_clean_utf8(tmp_path / "o" / name)
    assert "\U0001f600" in (tmp_path / "o" / "train.jsonl").read_text(encoding="utf-8")  # the emoji survives


# rows that parse badly in ways json reports with something other than JSONDecodeError
ODD_ROWS = [
    ("surrogate", '{"instruction": "Q\\ud800", "response": "A"}', "lone_surrogate", "instruction: lone UTF-16 surrogate '\\ud800'"),
    ("deep", DEEP, "too_deep", "JSON nested too deeply"),
    ("huge_int", '{"instruction": "Q", "response": ' + "9" * 5000 + "}", "invalid_json", "integer string conversion"),
]


@pytest.mark.parametrize("case,line,code,words", ODD_ROWS, ids=[c[0] for c in ODD_ROWS])
def test_odd_rows_are_row_errors_in_prepare_and_read_jsonl(tmp_path, case, line, code, words):
    path = tmp_path / "mine.jsonl"
    path.write_text(f'{{"instruction": "Q1", "response": "A1"}}\n{line}\n{{"instruction": "Q3", "response": "A3"}}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and words in str(e.value) and e.value.code == code
    with pytest.raises(DataError) as e:
        prepare(config(tmp_path / "o", "jsonl", path), log=lambda _: None)
    assert str(e.value).startswith(f"{path}:2: ") and words in str(e.value)
    m = prepare(config(tmp_path / "o", "jsonl", path, on_error="skip"), log=lambda _: None)
    assert m["sources"]["jsonl"]["dropped"] == {code: 1} and m["pool"] == 2
    rejected = (tmp_path / "o" / "rejected.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rejected) == 1 and json.loads(rejected[0])["where"] == f"{path}:2"


def test_deep_element_of_a_json_array_is_set_aside_and_the_next_one_read(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(f'[\n{{"instruction": "Q1", "output": "A1"}},\n{DEEP},\n{{"instruction": "Q3", "output": "A3"}}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        prepare(config(tmp_path / "o", "alpaca", path), log=lambda _: None)
    assert str(e.value).startswith(f"{path}:3 (array index 1): JSON nested too deeply") and e.value.code == "too_deep"
    m = prepare(config(tmp_path / "o", "alpaca", path, on_error="skip"), log=lambda _: None)
    assert m["sources"]["alpaca"]["dropped"] == {"too_deep": 1} and m["pool"] == 2


@pytest.mark.parametrize("name", ["one.json", "one.jsonl"])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_pretty_printed_object_says_what_the_file_is_and_what_is_accepted(tmp_path, name, on_error):
    path = tmp_path / name
    path.write_text(json.dumps({"instruction": "Q", "output": "A"}, indent=2) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        prepare(config(tmp_path / "o", "alpaca", path, on_error=on_error), log=lambda _: None)
    msg = str(e.value)
    assert msg.startswith(f"{path}:1: a single JSON object spanning lines 1-4")
    assert "a JSON array of records" in msg and "JSON Lines (one object per line)" in msg and "Expecting" not in msg
    assert not (tmp_path / "o").exists()


def test_file_name_that_is_not_utf8_still_writes_utf8(tmp_path):
    path = tmp_path / os.fsdecode(b"caf\xe9.jsonl")  # the name reaches Python as a surrogate escape
    try:
        write(path, [{"instruction": "Q", "response": "A"}])
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system does not take a name that is not UTF-8")
    prepare(config(tmp_path / "o", "jsonl", path), log=lambda _: None)
    for name in ("train.jsonl", "manifest.json"):
        assert_clean_utf8(tmp_path / "o" / name)
    assert read_jsonl(tmp_path / "o" / "train.jsonl")[0]["id"] == "caf\\xe9.jsonl:1"  # the byte, as rejected.jsonl shows raw bytes
    assert json.loads((tmp_path / "o" / "manifest.json").read_text(encoding="utf-8"))["sources"]["jsonl"]["path"] == str(path)


def test_cli_names_file_and_line_with_no_traceback(tmp_path, run_cli):
    src = tmp_path / "s.jsonl"
    src.write_text(f'{{"instruction": "Q1", "response": "A1"}}\n{{"instruction": "Q\\ud800", "response": "A"}}\n{DEEP}\n', encoding="utf-8")
    p = run_cli("prepare", "--source", f"jsonl={src}", "--out", str(tmp_path / "o"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{src}:2: instruction: lone UTF-16 surrogate" in p.stderr
    p = run_cli("prepare", "--source", f"jsonl={src}", "--out", str(tmp_path / "o"), "--on-error", "skip")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    rejected = [json.loads(line) for line in (tmp_path / "o" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["where"], r["reason"]) for r in rejected] == [(f"{src}:2", "lone_surrogate"), (f"{src}:3", "too_deep")]
    p = run_cli("stats", str(src))
    assert p.returncode == 1 and "Traceback" not in p.stderr and f"{src}:2: instruction: lone UTF-16 surrogate" in p.stderr
    one = tmp_path / "one.json"
    one.write_text('{\n  "instruction": "Q",\n  "output": "A"\n}\n', encoding="utf-8")
    p = run_cli("prepare", "--source", f"alpaca={one}", "--out", str(tmp_path / "o"))
    assert p.returncode == 1 and f"{one}:1: a single JSON object spanning lines 1-4" in p.stderr
    assert "--on-error skip" not in p.stderr  # skipping cannot help with the shape of a file


@pytest.mark.parametrize(
    "error",
    [
        DataError("a.jsonl:3", "missing field 'output'", "missing_field"),
        DataError("sources", "no examples"),
        RowError("wrong_type", "field 'x' must be a string"),
    ],
    ids=["DataError", "DataError-default-code", "RowError"],
)
def test_exceptions_survive_pickling(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert (back.code, back.reason) == (error.code, error.reason)
    assert getattr(back, "where", None) == getattr(error, "where", None)
