"""benchmarks/compare_reports.py: paired tests across two report runs of one test split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_reports.py"
REFS = ["the cat sat on the mat today", "a dog ran in the park at noon", "rain fell on the old town",
        "she wrote a long letter home", "the train left the station late", "birds sang in the tall trees"]


def _write(path: Path, systems: dict[str, list[str]], refs: list[str] = REFS) -> str:
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "reference": ref,
                                        **{k: v[i] for k, v in systems.items()}}) + "\n" for i, ref in enumerate(refs)))
    return str(path)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)


def test_compares_a_system_across_runs_and_two_systems_within_one(tmp_path):
    bad = ["x y z"] * len(REFS)
    a = _write(tmp_path / "a.jsonl", {"GaLore": bad, "QLoRA": bad})
    b = _write(tmp_path / "b.jsonl", {"GaLore": REFS, "QLoRA": bad})
    r = _run(a, b, "--pair", "GaLore", "--pair", "QLoRA:GaLore@b", "--bootstrap", "200")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| GaLore", "| QLoRA"))]
    assert len(rows) == 4  # 2 pairs x (BLEU-4, ROUGE-L)
    rouge = [line for line in rows if "| rougeL |" in line]
    # B's GaLore repeats the references, A's does not: a clear gain, interval above 0, in both pairs
    for line in rouge:
        delta, interval = line.split("|")[4:6]
        assert float(delta) > 0.5 and float(interval.strip(" []").split(",")[0]) > 0


def test_refuses_runs_on_different_test_splits(tmp_path):
    a = _write(tmp_path / "a.jsonl", {"GaLore": REFS})
    b = _write(tmp_path / "b.jsonl", {"GaLore": REFS}, refs=REFS[::-1])
    r = _run(a, b, "--pair", "GaLore")
    assert r.returncode != 0 and "references differ" in r.stderr


def test_names_the_missing_system(tmp_path):
    a = _write(tmp_path / "a.jsonl", {"GaLore": REFS})
    r = _run(a, a, "--pair", "QLoRA")
    assert r.returncode != 0 and "no system 'QLoRA'" in r.stderr


def test_names_the_file_and_line_of_a_bad_row(tmp_path):
    a = _write(tmp_path / "a.jsonl", {"GaLore": REFS})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(a).read_text().replace('"q2"', "q2", 1))
    r = _run(a, str(bad), "--pair", "GaLore")
    assert r.returncode != 0 and f"{bad}:3: invalid JSON" in r.stderr
