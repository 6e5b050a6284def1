"""Fixtures for the data stage: the shared real samples, small synthetic files, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# CI copies ../shared beside the checkout; locally it is /work/shared. Never a fixed absolute path.
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
ALPACA = SHARED_DATA / "alpaca_en_demo.json"
TULU = SHARED_DATA / "tulu_v2_sample.jsonl"
ULTRACHAT = SHARED_DATA / "ultrachat_sample.jsonl"


@pytest.fixture
def shared() -> dict[str, Path]:
    """The three real samples by kind; skips when ../shared is not beside the checkout."""
    files = {"alpaca": ALPACA, "tulu": TULU, "ultrachat": ULTRACHAT}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"the shared real data is not beside the checkout ({SHARED_DATA} lacks {', '.join(missing)})")
    return files


@pytest.fixture
def write_jsonl():
    def write(path: Path, rows: list) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def run_cli():
    return _run_cli


def _run_cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m duetto data ...`` as a user would run it."""
    full_env = {**os.environ, "PYTHONUTF8": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "duetto", "data", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
