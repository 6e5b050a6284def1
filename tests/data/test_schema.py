"""One schema for every reader of unified files: a file `prepare --source jsonl=FILE` accepts is one
`read_jsonl` (so `duetto train`, `duetto report`, `duetto data stats`) accepts, with the same
FILE:LINE errors for one it refuses."""

from __future__ import annotations

import json

import pytest

from duetto.data.sources import DataError
from duetto.data.unify import DataConfig, SourceConfig, prepare, read_jsonl

# rows in files users bring: no `input`, null `input`, integer ids, extra metadata keys
USER_ROWS = [
    {"instruction": f"Name the number {i}.", "response": f"It is {i}.", "lang": "en", "meta": {"score": i}}
    if i % 2
    else {"instruction": f"Double {i}.", "input": None if i % 4 else f"n={i}", "response": f"{2 * i}", "id": i, "tags": ["math"]}
    for i in range(16)
]

BAD_LINES = [
    ('{"response": "A"}', "missing field 'instruction'"),
    ('{"instruction": "Q", "input": ""}', "missing field 'response'"),
    ('{"instruction": "Q", "input": 3, "response": "A"}', "field 'input' must be a string, got a number"),
    ('{"instruction": "Q", "response": ["A"]}', "field 'response' must be a string, got an array"),
    ('{"instruction": "Q", "response": "A", "id": true}', "field 'id' must be a string, got a boolean"),
    ('{"instruction": "Q", "response": "A", "source": {}}', "field 'source' must be a string, got an object"),
    ('"Q"', "expected a JSON object, got a string"),
    ('{"instruction": ', "invalid JSON"),
]


def _prepare(path, out):
    return prepare(DataConfig(sources=[SourceConfig("jsonl", str(path))], out=str(out), train_size=12, test_size=4), log=lambda _: None)


def test_rows_without_input_and_with_extra_keys_read_everywhere(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "mine.jsonl", USER_ROWS)
    m = _prepare(path, tmp_path / "o")
    assert m["sizes"] == {"train": 12, "test": 4} and m["dropped"] == {}
    rows = read_jsonl(path)
    assert len(rows) == 16 and all(set(r) <= {"instruction", "input", "response", "source", "id"} for r in rows)
    assert rows[1] == {"instruction": "Name the number 1.", "input": "", "response": "It is 1."}
    assert rows[2] == {"instruction": "Double 2.", "input": "", "response": "4", "id": "2"}
    assert rows[4]["input"] == "n=4"
    # what prepare wrote reads back, ids kept
    written = read_jsonl(tmp_path / "o" / "train.jsonl") + read_jsonl(tmp_path / "o" / "test.jsonl")
    assert {r["id"] for r in written} == {str(i) for i in range(0, 16, 2)} | {f"mine.jsonl:{i + 1}" for i in range(1, 16, 2)}


def test_json_array_and_parquet_read_like_jsonl(tmp_path, write_jsonl):
    """prepare's jsonl kind reads .json arrays and parquet too; so does read_jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Q{i}", "input": None if i % 2 else "x", "response": f"A{i}", "extra": i} for i in range(6)]
    expected = read_jsonl(write_jsonl(tmp_path / "r.jsonl", rows))
    (tmp_path / "r.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    assert read_jsonl(tmp_path / "r.json") == expected == read_jsonl(tmp_path / "r.parquet")


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_prepare_and_read_jsonl_refuse_a_row_with_the_same_error(tmp_path, line, reason):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Q", "response": "A"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as from_prepare:
        _prepare(path, tmp_path / "o")
    with pytest.raises(DataError) as from_read:
        read_jsonl(path)
    assert str(from_prepare.value) == str(from_read.value)
    assert str(from_read.value).startswith(f"{path}:2: ") and reason in str(from_read.value)


def test_stats_names_the_same_error(tmp_path, run_cli):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Q"}\n', encoding="utf-8")
    p = run_cli("stats", str(path))
    assert p.returncode == 1 and f"duetto data stats: error: {path}:1: missing field 'response'" in p.stderr


def test_a_file_prepare_accepts_trains_and_reports(tmp_path, write_jsonl, tiny_gemma_dir):
    """`duetto train` reads the user's file directly (data.train / data.test), as the report reads data.test."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.trial import run_trial

    path = write_jsonl(tmp_path / "mine.jsonl", USER_ROWS)
    _prepare(path, tmp_path / "o")  # accepted as a jsonl source
    cfg = load_config(TrialConfig, None, [
        f"model={tiny_gemma_dir}", f"data.train={path}", f"data.test={path}", f"output_dir={tmp_path / 'trial'}",
        "method=galore", "galore.layerwise=false", "galore.rank=8", "galore.update_proj_gap=4",
        "max_seq_len=48", "batch_size=4", "max_steps=2", "logging_steps=1", "report_every_steps=2",
        "interim_eval_examples=2", "eval.num_examples=2", "eval.max_new_tokens=4", "eval.loss_examples=4",
        "scaling.num_workers=0",
    ])  # fmt: skip
    m = run_trial(cfg)
    assert m["num_train_examples"] == 16 and m["train_loss"] > 0
    assert read_jsonl(cfg.data.test)[0]["response"] == USER_ROWS[0]["response"]  # the report's reader
