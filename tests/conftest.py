"""Shared fixtures: tiny Gemma-3- and SmolLM2-shaped models, built once per test session (offline, < 1 s each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and with the 2 cores shared by parallel test runs
# OpenMP's spinning threads made a 10-step tiny training loop ~20x slower (45 s vs 2.4 s, measured).
# Set before torch is imported; subprocesses (CLI tests) inherit it; an explicit value is respected.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    """Folder of a 2-layer random Gemma 3 model + tokenizer (<pad>, <bos> added, <end_of_turn>, chat template)."""
    from duetto.tiny_model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-gemma"), style="gemma", seed=0)


@pytest.fixture(scope="session")
def tiny_smollm_dir(tmp_path_factory):
    """Folder of a 2-layer random Llama model with a SmolLM2-style ChatML tokenizer (no pad, eos <|im_end|>)."""
    from duetto.tiny_model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-smollm"), style="smollm", seed=0)


@pytest.fixture
def duetto_cache(tmp_path, monkeypatch):
    """Point DUETTO_CACHE at an empty temp folder, so a test never touches the user's model cache."""
    root = tmp_path / "duetto-cache"
    monkeypatch.setenv("DUETTO_CACHE", str(root))
    return root


# ../shared/data beside the checkout (CI copies it there); DUETTO_SHARED_DATA names another copy (a GPU
# machine, where only the checkout and what a run carries arrive)
SHARED = Path(os.environ.get("DUETTO_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def unified_data(tmp_path_factory) -> tuple[str, str]:
    """96 train / 24 test rows of real Alpaca data in our unified schema (short rows, so 64 tokens hold most)."""
    src = SHARED / "alpaca_en_demo.json"
    if not src.exists():
        pytest.skip(f"{src} not found (CI copies ../shared beside the checkout)")
    rows = [r for r in json.loads(src.read_text()) if len(r["instruction"]) + len(r["output"]) < 240]
    rows = [{"instruction": r["instruction"], "input": r["input"], "response": r["output"]} for r in rows[:120]]
    d = tmp_path_factory.mktemp("unified")
    for name, part in (("train.jsonl", rows[:96]), ("test.jsonl", rows[96:])):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(d / "train.jsonl"), str(d / "test.jsonl")


@pytest.fixture
def free_ports():
    """free_ports(n) -> n distinct free loopback ports (all held open while chosen, so none repeats)."""
    import socket

    def pick(n: int) -> list[int]:
        socks = [socket.socket() for _ in range(n)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            return [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()

    return pick
