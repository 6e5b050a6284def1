"""Cleaning, de-duplication, splitting, determinism, atomic outputs and bad input of ``prepare``."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from duetto.config import ConfigError, from_dict
from duetto.data.sources import DataError
from duetto.data.unify import DataConfig, SourceConfig, prepare, read_jsonl


def config(out: Path, *sources: tuple[str, Path], **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(kind=k, path=str(p)) for k, p in sources], out=str(out), **kw)


def assert_adds_up(manifest: dict) -> None:
    for label, info in manifest["sources"].items():
        assert info["examples"] == info["kept"] + sum(info["dropped"].values()), label
        assert info["kept"] >= info["train"] + info["test"], label
    assert manifest["pool"] == sum(i["kept"] for i in manifest["sources"].values())
    assert manifest["pool"] == manifest["sizes"]["train"] + manifest["sizes"]["test"] + manifest["unused"]


def assert_every_drop_listed(out: Path, manifest: dict) -> None:
    """dropped.jsonl (cleaning) plus rejected.jsonl (bad records) list each row the manifest counts as dropped."""
    listed = Counter((r["source"], r["reason"]) for name in ("dropped.jsonl", "rejected.jsonl") if (out / name).exists() for r in read_lines(out / name))
    counted = Counter({(label, code): n for label, info in manifest["sources"].items() for code, n in info["dropped"].items()})
    assert listed == counted
    assert manifest["outputs"]["dropped.jsonl"]["rows"] == len(read_lines(out / "dropped.jsonl"))


def norm_prompt(instruction: str, inp: str) -> str:
    return "".join((instruction + inp).split()).casefold()


# ---------------------------------------------------------------------------------------- real data


def test_shared_files_dedupe_across_sources(shared, tmp_path):
    m = prepare(config(tmp_path, *shared.items(), train_size=500, test_size=200), log=lambda s: None)
    assert_adds_up(m)
    assert_every_drop_listed(tmp_path, m)
    for label, info in m["sources"].items():
        assert info["rows_read"] == info["examples"] == info["kept"] + sum(info["dropped"].values())
    # UltraChat repeats Alpaca prompts (instruction and input glued together): count them here, independently
    alpaca = json.loads(shared["alpaca"].read_text(encoding="utf-8"))
    alpaca_prompts = {norm_prompt(r["instruction"], r["input"]) for r in alpaca}
    ultra = [json.loads(line) for line in shared["ultrachat"].read_text(encoding="utf-8").splitlines()]
    repeats = sum(norm_prompt(r["messages"][0]["content"], "") in alpaca_prompts for r in ultra)
    assert repeats > 400
    u = m["sources"]["ultrachat"]
    assert u["duplicate_of"].get("alpaca", 0) == repeats
    assert u["dropped"].get("duplicate_exact", 0) + u["dropped"].get("duplicate_prompt", 0) == sum(u["duplicate_of"].values())
    # the glued copies differ from Alpaca's text exactly, so only the normalised key catches them
    assert u["dropped"]["duplicate_prompt"] > 0
    assert m["sources"]["alpaca"]["dropped"]["duplicate_exact"] == len(alpaca) - len({json.dumps([r["instruction"].strip(), r["input"].strip(), r["output"].strip()]) for r in alpaca})

    assert m["sizes"] == {"train": 500, "test": 200} and m["notes"] == []
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    assert len(train) == 500 and len(test) == 200
    assert sum(i["train"] for i in m["sources"].values()) == 500
    prompts = [norm_prompt(r["instruction"], r["input"]) for r in train + test]
    assert len(set(prompts)) == len(prompts)  # no prompt twice, so none leaks from train into test
    for name in ("train.jsonl", "test.jsonl"):
        assert m["outputs"][name]["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert json.loads((tmp_path / "manifest.json").read_text()) == m


def test_shared_files_all_turns(shared, tmp_path):
    m = prepare(config(tmp_path, *shared.items(), multi_turn="all", max_chars=4000), log=lambda s: None)
    assert_adds_up(m)
    assert_every_drop_listed(tmp_path, m)
    assert any("#" in r["id"] for r in read_lines(tmp_path / "dropped.jsonl"))  # one line per example, not per record
    tulu = m["sources"]["tulu"]
    assert tulu["examples"] > tulu["rows_read"] and tulu["dropped"]["too_long"] > 0
    for r in read_jsonl(tmp_path / "train.jsonl"):
        assert len(r["instruction"]) + len(r["input"]) + len(r["response"]) <= 4000


# ---------------------------------------------------------------------------------------- cleaning, dedupe


def test_cleaning_and_dedupe_rules(tmp_path, write_jsonl):
    alpaca = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "  Reword this sentence\r\n", "input": "The idea made me smile", "output": " R1 "},
            {"instruction": "Reword this sentence", "input": "The idea made me smile", "output": "R1"},  # exact, after strip
            {"instruction": "Q2", "input": "", "output": "   "},  # empty response
            {"instruction": " \n", "input": "", "output": "x"},  # empty instruction
            {"instruction": "Q3", "input": "", "output": "y" * 50},  # too long
            {"instruction": "Q4", "input": "", "output": "R1"},  # same answer, new prompt: kept
        ],
    )
    ultra = write_jsonl(
        tmp_path / "u.jsonl",
        [
            # a copy with instruction and input joined by a newline, other spacing and case, another answer
            {"prompt": "x", "messages": [{"role": "user", "content": "reword THIS  sentence\nThe idea made me smile"}, {"role": "assistant", "content": "R2"}]},
            {"prompt": "y", "messages": [{"role": "user", "content": "Q5"}, {"role": "assistant", "content": "R5"}]},
        ],
    )
    m = prepare(config(tmp_path / "o", ("alpaca", alpaca), ("ultrachat", ultra), max_chars=48, train_size=2, test_size=1), log=lambda s: None)
    assert_adds_up(m)
    a, u = m["sources"]["alpaca"], m["sources"]["ultrachat"]
    assert a["dropped"] == {"duplicate_exact": 1, "empty_instruction": 1, "empty_response": 1, "too_long": 1}
    assert a["kept"] == 2 and a["duplicate_of"] == {"alpaca": 1}
    assert u["dropped"] == {"duplicate_prompt": 1} and u["duplicate_of"] == {"alpaca": 1} and u["kept"] == 1
    rows = read_jsonl(tmp_path / "o" / "train.jsonl") + read_jsonl(tmp_path / "o" / "test.jsonl")
    assert {"instruction": "Reword this sentence", "input": "The idea made me smile", "response": "R1", "source": "alpaca", "id": "a.jsonl:1"} in rows

    # the earlier source keeps a shared example: swap the order and UltraChat's copy survives
    m2 = prepare(config(tmp_path / "o2", ("ultrachat", ultra), ("alpaca", alpaca), max_chars=48, train_size=2, test_size=1), log=lambda s: None)
    assert m2["sources"]["ultrachat"]["kept"] == 2
    # both Alpaca copies now repeat UltraChat's prompt, the first occurrence
    assert m2["sources"]["alpaca"]["duplicate_of"] == {"ultrachat": 2}
    assert m2["sources"]["alpaca"]["dropped"]["duplicate_prompt"] == 2


def test_dropped_jsonl_lists_each_dropped_row_and_what_it_duplicates(tmp_path, write_jsonl):
    alpaca = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Q1", "input": "", "output": "A1"},
            {"instruction": " Q1 ", "input": "", "output": "A1"},
            {"instruction": "q 1", "input": "", "output": "other"},
            {"instruction": " ", "input": "", "output": "x"},
            {"instruction": "Q5", "input": "", "output": ""},
            {"instruction": "Q6", "input": "", "output": "y" * 50},
        ],
    )
    tulu = write_jsonl(tmp_path / "t.jsonl", [{"id": "t-1", "messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A9"}]}])
    out = tmp_path / "o"
    m = prepare(config(out, ("alpaca", alpaca), ("tulu", tulu), max_chars=40, train_size=1, test_size=0), log=lambda s: None)
    first = {"source": "alpaca", "id": "a.jsonl:1"}
    assert read_lines(out / "dropped.jsonl") == [
        {"source": "alpaca", "id": "a.jsonl:2", "where": f"{alpaca}:2", "reason": "duplicate_exact", "duplicate_of": first},
        {"source": "alpaca", "id": "a.jsonl:3", "where": f"{alpaca}:3", "reason": "duplicate_prompt", "duplicate_of": first},
        {"source": "alpaca", "id": "a.jsonl:4", "where": f"{alpaca}:4", "reason": "empty_instruction"},
        {"source": "alpaca", "id": "a.jsonl:5", "where": f"{alpaca}:5", "reason": "empty_response"},
        {"source": "alpaca", "id": "a.jsonl:6", "where": f"{alpaca}:6", "reason": "too_long"},
        {"source": "tulu", "id": "t-1", "where": f"{tulu}:1", "reason": "duplicate_prompt", "duplicate_of": first},
    ]
    assert_every_drop_listed(out, m)
    assert m["outputs"]["dropped.jsonl"]["sha256"] == hashlib.sha256((out / "dropped.jsonl").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- split, determinism


def synthetic(tmp_path, n: int, write_jsonl) -> Path:
    return write_jsonl(tmp_path / f"s{n}.jsonl", [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(n)])


def test_byte_identical_outputs_and_seed_changes_them(tmp_path, write_jsonl):
    src = synthetic(tmp_path, 60, write_jsonl)
    out = tmp_path / "out"
    names = ("train.jsonl", "test.jsonl", "dropped.jsonl", "manifest.json")
    prepare(config(out, ("alpaca", src), train_size=30, test_size=10, seed=7))
    first = {n: (out / n).read_bytes() for n in names}
    prepare(config(out, ("alpaca", src), train_size=30, test_size=10, seed=7))
    assert {n: (out / n).read_bytes() for n in names} == first
    prepare(config(out, ("alpaca", src), train_size=30, test_size=10, seed=8))
    assert (out / "train.jsonl").read_bytes() != first["train.jsonl"]
    assert (out / "test.jsonl").read_bytes() != first["test.jsonl"]


def test_test_split_does_not_depend_on_train_size(tmp_path, write_jsonl):
    src = synthetic(tmp_path, 60, write_jsonl)
    m1 = prepare(config(tmp_path / "a", ("alpaca", src), train_size=10, test_size=15))
    m2 = prepare(config(tmp_path / "b", ("alpaca", src), train_size=40, test_size=15))
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    assert m1["unused"] == 35 and m2["unused"] == 5
    assert_adds_up(m1)


def test_short_pool_warns_and_keeps_the_test_share(tmp_path, write_jsonl, capsys):
    src = synthetic(tmp_path, 14, write_jsonl)
    m = prepare(config(tmp_path / "o", ("alpaca", src)))  # asks 5000 + 2000
    assert m["sizes"] == {"train": 10, "test": 4}  # test = round(14 * 2/7)
    assert "only 14 examples" in capsys.readouterr().err
    assert "only 14 examples" in m["notes"][0]


def test_no_examples_left_is_an_error(tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "Q", "input": "", "output": " "}])
    with pytest.raises(DataError, match="no examples left"):
        prepare(config(tmp_path / "o", ("alpaca", src)))
    assert not (tmp_path / "o" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------- atomic outputs


def test_failures_leave_no_partial_output_looking_complete(tmp_path, write_jsonl):
    good = synthetic(tmp_path, 20, write_jsonl)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Q", "output": "A"}\n{oops\n', encoding="utf-8")
    out = tmp_path / "out"
    prepare(config(out, ("alpaca", good), train_size=10, test_size=5))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # bad input is found before anything is written: the last good output stays whole
    with pytest.raises(DataError):
        prepare(config(out, ("alpaca", good), ("jsonl", bad), train_size=10, test_size=5))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a write that fails half-way leaves no manifest, so the folder does not look complete
    (out / "test.jsonl").unlink()
    (out / "test.jsonl").mkdir()
    with pytest.raises(OSError):
        prepare(config(out, ("alpaca", good), train_size=10, test_size=5, seed=3))
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["dropped.jsonl", "test.jsonl", "train.jsonl"]  # no temp files left


def test_rejected_file_only_from_a_skip_run(tmp_path, write_jsonl):
    src = synthetic(tmp_path, 10, write_jsonl)
    out = tmp_path / "o"
    m = prepare(config(out, ("alpaca", src), train_size=5, test_size=2, on_error="skip"))
    assert (out / "rejected.jsonl").read_bytes() == b"" and m["outputs"]["rejected.jsonl"]["rows"] == 0
    prepare(config(out, ("alpaca", src), train_size=5, test_size=2))
    assert not (out / "rejected.jsonl").exists()


# ---------------------------------------------------------------------------------------- bad input

GOOD_ALPACA = '{"instruction": "Q", "input": "", "output": "A"}'
GOOD_CHAT = '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}'
GOOD_SHAREGPT = '{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}'

# (case, kind, file name, file bytes, line the error is on, words of the reason, manifest reason code)
ROW_ERRORS = [
    ("invalid_json", "tulu", "t.jsonl", f'{GOOD_CHAT}\n{{"messages": [\n', "2", "invalid JSON", "invalid_json"),
    ("non_utf8", "alpaca", "a.jsonl", GOOD_ALPACA.encode() + b'\n\n{"instruction": "caf\xe9", "output": "x"}\n', "3", "not UTF-8", "invalid_utf8"),
    ("missing_field", "alpaca", "a.json", f'[\n  {GOOD_ALPACA},\n  {{"instruction": "x"}}\n]\n', "3 (array index 1)", "missing field 'output'", "missing_field"),
    ("wrong_type", "alpaca", "a.json", f'[{GOOD_ALPACA},\n{{"instruction": "x", "output": 5}}]', "2 (array index 1)", "field 'output' must be a string, got a number", "wrong_type"),
    ("unknown_role", "tulu", "t.jsonl", f'{GOOD_CHAT}\n{{"messages": [{{"role": "bot", "content": "Q"}}]}}\n', "2", "unknown role 'bot'", "unknown_role"),
    ("no_assistant", "ultrachat", "u.jsonl", f'{{"messages": [{{"role": "user", "content": "Q"}}]}}\n{GOOD_CHAT}\n', "1", "no assistant turn", "no_assistant_turn"),
    ("turn_order", "sharegpt", "s.jsonl", f'{GOOD_SHAREGPT}\n{{"conversations": [{{"from": "gpt", "value": "A"}}, {{"from": "human", "value": "Q"}}]}}\n', "2", "'assistant' turn where a 'user' turn was expected", "bad_turn_order"),
    ("not_an_object", "jsonl", "j.jsonl", '[1, 2]\n{"instruction": "Q", "response": "A"}\n', "1", "expected a JSON object, got an array", "not_an_object"),
    ("messages_not_list", "tulu", "t.jsonl", f'{GOOD_CHAT}\n{{"messages": "hi"}}\n', "2", "field 'messages' must be an array of messages, got a string", "wrong_type"),
    ("message_missing_value", "sharegpt", "s.jsonl", f'{{"conversations": [{{"from": "human", "value": "Q"}}, {{"from": "gpt"}}]}}\n{GOOD_SHAREGPT}\n', "1", "conversations[1]: missing field 'value'", "missing_field"),
    ("content_null", "ultrachat", "u.jsonl", f'{GOOD_CHAT}\n{{"messages": [{{"role": "user", "content": "Q"}}, {{"role": "assistant", "content": null}}]}}\n', "2", "messages[1].content must be a string, got null", "wrong_type"),
    ("unified_missing_response", "jsonl", "j.jsonl", '{"instruction": "Q", "response": "A"}\n{"instruction": "Q2"}\n', "2", "missing field 'response'", "missing_field"),
]


@pytest.mark.parametrize("case,kind,name,content,line,reason,code", ROW_ERRORS, ids=[c[0] for c in ROW_ERRORS])
def test_bad_row_fails_naming_file_line_and_reason(tmp_path, case, kind, name, content, line, reason, code):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(DataError) as e:
        prepare(config(tmp_path / "o", (kind, path), train_size=1, test_size=0))
    assert str(e.value).startswith(f"{path}:{line}: ")
    assert reason in str(e.value)
    assert e.value.code == code
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case,kind,name,content,line,reason,code", ROW_ERRORS, ids=[c[0] for c in ROW_ERRORS])
def test_bad_row_skipped_into_rejected_jsonl(tmp_path, case, kind, name, content, line, reason, code):
    path = tmp_path / name
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    m = prepare(config(tmp_path / "o", (kind, path), train_size=1, test_size=0, on_error="skip"))
    assert_adds_up(m)
    info = m["sources"][kind]
    assert info["dropped"] == {code: 1} and info["kept"] == 1
    rejected = read_lines(tmp_path / "o" / "rejected.jsonl")
    assert len(rejected) == 1 and m["outputs"]["rejected.jsonl"]["rows"] == 1
    r = rejected[0]
    assert r["where"].startswith(f"{path}:{line}") and r["reason"] == code and reason in r["message"] and r["source"] == kind
    if case == "non_utf8":
        assert r["raw"] == '{"instruction": "caf\\xe9", "output": "x"}'
    elif name.endswith(".jsonl"):  # the raw text is the bad line exactly
        assert r["raw"] == data.decode().split("\n")[int(line) - 1]
    else:
        assert r["raw"].startswith("{") and reason.split("'")[1] in data.decode()


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# file-level problems stop the run under either error policy: there is no row to set aside
FILE_ERRORS = [
    ("empty_file", "tulu", "t.jsonl", b"", ":1", "empty file"),
    ("empty_array", "alpaca", "a.json", b"[\n  ]\n", ":2", "empty file"),
    ("array_syntax", "alpaca", "a.json", f'[\n{GOOD_ALPACA},\n{{"instruction": "x" "output": "y"}}\n]'.encode(), ":3", "invalid JSON in array index 1"),
    ("array_non_utf8", "alpaca", "a.json", f'[\n{GOOD_ALPACA},\n'.encode() + b'{"instruction": "\xff", "output": "y"}]', ":3", "not UTF-8"),
    ("unknown_format", "alpaca", "a.txt", b"hello\n", "", "unknown file format '.txt'"),
    ("not_found", "alpaca", None, None, "", "file not found"),
]


@pytest.mark.parametrize("case,kind,name,content,where,reason", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_bad_file_stops_in_both_modes(tmp_path, case, kind, name, content, where, reason, on_error):
    path = tmp_path / (name or "missing.json")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as e:
        prepare(config(tmp_path / "o", (kind, path), on_error=on_error))
    assert str(e.value).startswith(f"{path}{where}: ") and reason in str(e.value)
    assert not (tmp_path / "o").exists()


def test_unknown_source_kind_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sources\[0\]\.kind: must be one of .*'alpaca'.*got 'dolly'"):
        from_dict(DataConfig, {"sources": [{"kind": "dolly", "path": "x.json"}]})
    with pytest.raises(ConfigError, match="labelled 'alpaca'"):
        from_dict(DataConfig, {"sources": [{"kind": "alpaca", "path": "a.json"}, {"kind": "alpaca", "path": "b.json"}]})
    with pytest.raises(ConfigError, match="at least one source"):
        from_dict(DataConfig, {})


# ---------------------------------------------------------------------------------------- read_jsonl


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"input": "", "response": "A", "source": "s", "id": "1"}', "missing field 'instruction'"),
        ('{"instruction": "Q", "input": "", "source": "s", "id": "1"}', "missing field 'response'"),
        ('{"instruction": "Q", "input": 2, "response": "A"}', "field 'input' must be a string, got a number"),
        ('{"instruction": "Q", "input": "", "response": "A", "id": [3]}', "field 'id' must be a string, got an array"),
        ('{"instruction": "Q", "input": "", "response": 4, "source": "s", "id": "1"}', "field 'response' must be a string"),
        ('{"instruction": "Q", "input": "", "response": "A", "source": 1}', "field 'source' must be a string, got a number"),
        ('["Q", "A"]', "expected a JSON object, got an array"),
        ('{"instruction": "Q"', "invalid JSON"),
    ],
)
def test_read_jsonl_checks_the_schema(tmp_path, line, reason):
    good = '{"instruction": "Q", "input": "", "response": "A", "source": "s", "id": "1"}'
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: .*{re.escape(reason)}"):
        read_jsonl(path)
    path.write_text(f"{good}\n", encoding="utf-8")
    assert read_jsonl(path) == [json.loads(good)]


def test_read_jsonl_accepts_files_without_provenance(tmp_path):
    """Hand-made files in our schema need not carry `source`/`id` (`duetto data prepare` writes them)."""
    p = tmp_path / "mine.jsonl"
    p.write_text('{"instruction": "Q", "input": "", "response": "A"}\n')
    assert read_jsonl(p) == [{"instruction": "Q", "input": "", "response": "A"}]


def test_read_jsonl_reads_input_as_optional_and_ignores_extra_keys(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"instruction": "Q", "response": "A", "id": 7, "lang": "en"}\n{"instruction": "R", "input": null, "response": "B"}\n')
    assert read_jsonl(p) == [{"instruction": "Q", "input": "", "response": "A", "id": "7"}, {"instruction": "R", "input": "", "response": "B"}]
