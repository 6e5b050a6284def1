from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def small_unified_data(tmp_path_factory) -> tuple[str, str]:
    """48 train / 12 test rows of real Alpaca data in the unified schema (short rows)."""
    src = SHARED / "alpaca_en_demo.json"
    if not src.exists():
        pytest.skip(f"{src} not found (CI copies ../shared beside the checkout)")
    rows = [r for r in json.loads(src.read_text()) if len(r["instruction"]) + len(r["output"]) < 200]
    rows = [{"instruction": r["instruction"], "input": r["input"], "response": r["output"]} for r in rows[:60]]
    d = tmp_path_factory.mktemp("unified")
    for name, part in (("train.jsonl", rows[:48]), ("test.jsonl", rows[48:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(d / "train.jsonl"), str(d / "test.jsonl")
