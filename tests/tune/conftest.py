"""Fixtures for the tune stage: real data rows, sweep files written per test, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# CI copies ../shared beside the checkout; locally it is /work/shared.
ALPACA = (REPO.parent / "shared" / "data" / "alpaca_en_demo.json").resolve()


@pytest.fixture(scope="session")
def sweep_data(tmp_path_factory) -> tuple[str, str]:
    """48 train / 12 test rows of real Alpaca data in the unified schema (short rows)."""
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} not found (CI copies ../shared beside the checkout)")
    rows = [r for r in json.loads(ALPACA.read_text()) if len(r["instruction"]) + len(r["output"]) < 200]
    rows = [{"instruction": r["instruction"], "input": r["input"], "response": r["output"]} for r in rows[:60]]
    d = tmp_path_factory.mktemp("sweep-data")
    for name, part in (("train.jsonl", rows[:48]), ("test.jsonl", rows[48:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(d / "train.jsonl"), str(d / "test.jsonl")


@pytest.fixture
def write_yaml(tmp_path):
    def write(data: dict, name: str = "sweep.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def run_duetto(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 1500) -> subprocess.CompletedProcess:
    """``python -m duetto ...`` as a user runs it, Ray's usage stats off. It runs in a process session of
    its own, so a timeout (or an interrupted test) ends it together with the local Ray it started."""
    full = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUTF8": "1", **(env or {})}
    cmd = [sys.executable, "-m", "duetto", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def duetto_cli():
    return run_duetto
