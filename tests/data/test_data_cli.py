"""``duetto data`` driven as a user runs it: ``python -m duetto data ...`` in a subprocess."""

from __future__ import annotations

import hashlib
import json
import shutil

from duetto.data.unify import read_jsonl


def check_manifest(out, m: dict) -> None:
    for label, info in m["sources"].items():
        assert info["rows_read"] == info["kept"] + sum(info["dropped"].values()), label
    assert m["pool"] == sum(i["kept"] for i in m["sources"].values())
    assert m["pool"] == m["sizes"]["train"] + m["sizes"]["test"] + m["unused"]
    for name, o in m["outputs"].items():
        data = (out / name).read_bytes()
        assert o["sha256"] == hashlib.sha256(data).hexdigest() and o["rows"] == data.count(b"\n")
    assert len(read_jsonl(out / "train.jsonl")) == m["sizes"]["train"]
    assert len(read_jsonl(out / "test.jsonl")) == m["sizes"]["test"]


def test_prepare_from_source_flags(shared, tmp_path, run_cli):
    out = tmp_path / "data"
    p = run_cli(
        "prepare",
        *(f"--source={kind}={path}" for kind, path in shared.items()),
        f"--out={out}", "--train-size=600", "--test-size=240", "--seed=3",
    )
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    check_manifest(out, m)
    assert m["sizes"] == {"train": 600, "test": 240} and m["seed"] == 3
    assert [s["path"] for s in m["config"]["sources"]] == [str(v) for v in shared.values()]
    assert m["sources"]["ultrachat"]["duplicate_of"].get("alpaca", 0) > 400  # the README's cross-source repeats
    assert m["tool"].startswith("duetto ")
    assert "ultrachat" in p.stdout and "wrote" in p.stdout
    dropped = (out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(dropped) == sum(m["dropped"].values()) > 400 and f"dropped.jsonl ({len(dropped)})" in p.stdout
    assert f"listed in {out}/dropped.jsonl" in p.stdout


def test_prepare_from_the_shipped_config(shared, tmp_path, run_cli, repo):
    # the YAML's ../shared paths resolve against the current directory: run from the repo root
    out = tmp_path / "data"
    p = run_cli("prepare", "--config", "configs/data_shared.yaml", f"out={out}", cwd=repo)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    check_manifest(out, m)
    assert list(m["sources"]) == ["alpaca", "tulu", "ultrachat"]
    # the samples hold fewer than 5000 + 2000 examples: a warning, a note, and the 2/7 test share
    assert "warning: only" in p.stderr and m["notes"] and m["unused"] == 0
    assert m["sizes"]["test"] == round(m["pool"] * 2 / 7)


def test_bad_input_exit_status_and_message(tmp_path, run_cli):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n{"messages": [{"role": "bot", "content": "Q"}]}\n', encoding="utf-8")
    p = run_cli("prepare", "--source", f"tulu={bad}", "--out", str(tmp_path / "o"))
    assert p.returncode == 1
    assert f"{bad}:2: messages[0].role: unknown role 'bot'" in p.stderr and "--on-error skip" in p.stderr
    assert not (tmp_path / "o").exists()
    p = run_cli("prepare", "--source", f"tulu={bad}", "--out", str(tmp_path / "o"), "--on-error", "skip", "--train-size", "1", "--test-size", "0")
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["sources"]["tulu"]["dropped"] == {"unknown_role": 1}
    rejected = [json.loads(line) for line in (tmp_path / "o" / "rejected.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rejected] == [f"{bad}:2"]


def test_unknown_kind_and_missing_file(tmp_path, run_cli):
    p = run_cli("prepare", "--source", "dolly=x.jsonl", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "unknown source kind 'dolly'" in p.stderr
    p = run_cli("prepare", "--source", f"alpaca={tmp_path / 'nope.json'}", "--out", str(tmp_path / "o"))
    assert p.returncode == 1 and f"{tmp_path / 'nope.json'}: file not found" in p.stderr
    p = run_cli("prepare", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "at least one source" in p.stderr


def test_dataset_folder_goes_through_the_hub_loader(shared, tmp_path, run_cli):
    # `datasets.load_dataset` on a local folder is the code path a hub id takes, minus the download;
    # the file name gives the split, and UltraChat's default split is train_sft
    folder = tmp_path / "ultrachat_200k" / "data"
    folder.mkdir(parents=True)
    shutil.copy(shared["ultrachat"], folder / "train_sft-00000-of-00001.jsonl")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    out = tmp_path / "o"
    p = run_cli("prepare", "--source", f"ultrachat={folder.parent}", "--out", str(out), "--train-size", "300", "--test-size", "100", env=env)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    check_manifest(out, m)
    u = m["sources"]["ultrachat"]
    assert u["format"] == "hub" and u["split"] == "train_sft" and u["rows_read"] == 450
    # the same rows as the file read directly
    direct = tmp_path / "d"
    p = run_cli("prepare", "--source", f"ultrachat={shared['ultrachat']}", "--out", str(direct), "--train-size", "300", "--test-size", "100")
    assert p.returncode == 0, p.stderr
    strip_ids = lambda path: [(r["instruction"], r["response"]) for r in read_jsonl(path)]  # noqa: E731
    assert strip_ids(out / "train.jsonl") == strip_ids(direct / "train.jsonl")


def test_stats(tmp_path, run_cli):
    good = tmp_path / "train.jsonl"
    good.write_text('{"instruction": "Q", "input": "", "response": "A", "source": "alpaca", "id": "1"}\n', encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Q"}\n', encoding="utf-8")
    p = run_cli("stats", str(good), str(bad))
    assert p.returncode == 1
    assert f"{good}: 1 rows (alpaca 1)" in p.stdout and f"{bad}:1: missing field 'response'" in p.stderr


def test_stats_counts_rows_without_source(tmp_path, run_cli):
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"instruction": "Q", "response": "A"}\n{"instruction": "R", "response": "B", "source": "x"}\n', encoding="utf-8")
    p = run_cli("stats", str(mine))
    assert p.returncode == 0, p.stderr
    assert f"{mine}: 2 rows ((no source) 1, x 1)" in p.stdout and "Traceback" not in p.stderr


def test_prepare_flags_come_from_the_config_class(tmp_path, run_cli):
    """Flag help shows the dataclass's default; flags override the YAML; overrides override flags."""
    p = run_cli("prepare", "--help")
    assert p.returncode == 0 and "(default: 5000)" in p.stdout and "--max-chars" in p.stdout
    src = tmp_path / "s.jsonl"
    src.write_text("".join(f'{{"instruction": "Q{i}", "response": "A{i}"}}\n' for i in range(10)), encoding="utf-8")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"sources: [{{kind: alpaca, path: nowhere.json}}]\nout: {tmp_path / 'yaml'}\ntrain_size: 1\ntest_size: 1\n")
    out = tmp_path / "o"
    p = run_cli("prepare", "--config", str(cfg), "--source", f"jsonl={src}", "--out", str(out), "--train-size", "6", "test_size=2")
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["sizes"] == {"train": 6, "test": 2} and list(m["sources"]) == ["jsonl"]
    p = run_cli("prepare", "--source", f"jsonl={src}", "--out", str(out), "--on-error", "maybe")
    assert p.returncode == 2 and "invalid choice: 'maybe'" in p.stderr
