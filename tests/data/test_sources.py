"""Each source schema, read from the shared real files and from small synthetic files."""

from __future__ import annotations

import json

import pytest

from duetto.data.sources import Example, read_rows, render_history, to_examples


def examples_of(path, kind, multi_turn="first", **kw):
    out = []
    for row in read_rows(str(path), kind, **kw):
        assert row.error is None, row.where
        out.extend(to_examples(kind, row.obj, row.ref, multi_turn))
    return out


def test_alpaca_shared_file(shared):
    raw = json.loads(shared["alpaca"].read_text(encoding="utf-8"))
    rows = list(read_rows(str(shared["alpaca"]), "alpaca"))
    assert len(rows) == len(raw) == 999
    # each row keeps its exact source text and the line it starts on
    lines = shared["alpaca"].read_text(encoding="utf-8").split("\n")
    for i in (0, 1, 500, 998):
        assert json.loads(rows[i].raw) == raw[i] == rows[i].obj
        line = int(rows[i].ref.rsplit(":", 1)[1])
        assert lines[line - 1].strip().startswith("{")
        assert rows[i].where == f"{shared['alpaca']}:{line} (array index {i})"
    exs = examples_of(shared["alpaca"], "alpaca")
    assert [(e.instruction, e.input, e.response) for e in exs] == [(r["instruction"], r["input"], r["output"]) for r in raw]
    assert sum(bool(e.input) for e in exs) == 412  # the README's count of rows with an input
    assert exs[0].id == "alpaca_en_demo.json:2"


def test_tulu_shared_file(shared):
    raw = [json.loads(line) for line in shared["tulu"].read_text(encoding="utf-8").splitlines()]
    first = examples_of(shared["tulu"], "tulu")
    assert len(first) == len(raw) == 300
    for ex, r in zip(first, raw):
        msgs = r["messages"]
        u = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        assert ex.id == r["id"]
        assert ex.instruction == msgs[u]["content"] and ex.response == msgs[u + 1]["content"]
        system = [m["content"].strip() for m in msgs[:u] if m["role"] == "system"]
        assert ex.input == ("System: " + system[0] if system else "")
    assert sum(e.input.startswith("System: ") for e in first) == sum(r["messages"][0]["role"] == "system" for r in raw) > 0

    every = examples_of(shared["tulu"], "tulu", multi_turn="all")
    assert len(every) == sum(m["role"] == "assistant" for r in raw for m in r["messages"])
    multi = next(r for r in raw if sum(m["role"] == "assistant" for m in r["messages"]) >= 3)
    mine = [e for e in every if e.id.startswith(multi["id"] + "#")]
    assert [e.id for e in mine] == [f"{multi['id']}#{k}" for k in range(1, len(mine) + 1)]
    assert mine[2].instruction == multi["messages"][4]["content"]
    assert mine[2].input.startswith("User: ") and "\n\nAssistant: " in mine[2].input


def test_ultrachat_shared_file(shared):
    raw = [json.loads(line) for line in shared["ultrachat"].read_text(encoding="utf-8").splitlines()]
    exs = examples_of(shared["ultrachat"], "ultrachat")
    assert len(exs) == 450
    assert [e.instruction for e in exs] == [r["prompt"] for r in raw]
    assert [e.id for e in exs] == [r["prompt_id"] for r in raw]
    assert all(e.input == "" for e in exs)


def test_limit_reads_the_first_rows(shared):
    assert len(list(read_rows(str(shared["tulu"]), "tulu", limit=7))) == 7


SHAREGPT = [
    {
        "id": "sg1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Another?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Thanks"},  # trailing turn with no answer: no example
        ],
    },
    {"conversations": [{"from": "user", "value": "Hi"}, {"from": "chatgpt", "value": "Hello!"}]},
]


def test_sharegpt_first_and_all(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    first = examples_of(path, "sharegpt")
    assert first == [
        Example("Name a colour.", "System: Be brief.", "Blue.", "sg1"),
        Example("Hi", "", "Hello!", "sg.jsonl:2"),  # no id in the record: file:line
    ]
    every = examples_of(path, "sharegpt", multi_turn="all")
    assert every == [
        Example("Name a colour.", "System: Be brief.", "Blue.", "sg1#1"),
        Example("Another?", "System: Be brief.\n\nUser: Name a colour.\n\nAssistant: Blue.", "Red.", "sg1#2"),
        Example("Hi", "", "Hello!", "sg.jsonl:2"),
    ]


def test_render_history():
    turns = [("system", " S "), ("user", "u1\n"), ("assistant", "a1")]
    assert render_history(turns) == "System: S\n\nUser: u1\n\nAssistant: a1"
    assert render_history([]) == ""


def test_unified_jsonl_source(tmp_path, write_jsonl):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"instruction": "Add", "input": "2 2", "response": "4", "source": "x", "id": "orig-7"},
            {"instruction": "Hi", "response": "Hello"},  # input is optional
        ],
    )
    assert examples_of(path, "jsonl") == [Example("Add", "2 2", "4", "orig-7"), Example("Hi", "", "Hello", "mine.jsonl:2")]


def test_json_array_line_numbers_and_jsonl_named_json(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n\n  {\n    "instruction": "c",\n    "output": "d"\n  }\n]\n',
        encoding="utf-8",
    )
    rows = list(read_rows(str(arr), "alpaca"))
    assert [r.where for r in rows] == [f"{arr}:2 (array index 0)", f"{arr}:4 (array index 1)"]
    lines = tmp_path / "b.json"  # JSON Lines under a .json name, as many dumps are
    lines.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    assert [r.where for r in read_rows(str(lines), "alpaca")] == [f"{lines}:1", f"{lines}:2"]


def test_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "i1", "input": "", "output": "o1"}, {"instruction": "i2", "input": "x", "output": "o2"}]), tmp_path / "al.parquet")
    assert examples_of(tmp_path / "al.parquet", "alpaca") == [
        Example("i1", "", "o1", "al.parquet:row 1"),
        Example("i2", "x", "o2", "al.parquet:row 2"),
    ]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.Table.from_pylist([{"dataset": "d", "id": "t-1", "messages": msgs}]), tmp_path / "tu.parquet")
    assert examples_of(tmp_path / "tu.parquet", "tulu") == [Example("q", "", "a", "t-1")]


@pytest.mark.parametrize("kind", ["tulu", "ultrachat"])
def test_system_turns_only_at_the_start(kind):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_examples(kind, ok, "r") == [Example("q", "", "a", "r")]
    late_system = {"messages": ok["messages"] + [{"role": "system", "content": "s"}]}
    with pytest.raises(ValueError, match="message 2 is a 'system' turn"):
        to_examples(kind, late_system, "r")
