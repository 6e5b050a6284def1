"""A packed trial's Tune process is a thin client: it finds its pack (trainers/pack_groups.py) without
importing torch, which its pack actor imports once for every trial it trains."""

from __future__ import annotations

import subprocess
import sys


def test_a_packed_trial_finds_its_pack_without_importing_torch(tiny_gemma_dir, unified_data):
    train, test = unified_data
    code = f"""
import sys
from duetto.config import load_config
from duetto.trainers.config import TrialConfig
from duetto.trainers.pack_groups import group_key
import duetto.tune.packing
cfg = load_config(TrialConfig, None, ["model={tiny_gemma_dir}", "data.train={train}", "data.test={test}", "method=qlora"])
print(group_key(cfg))
assert "torch" not in sys.modules, "torch imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip()) == 10


def test_trials_that_differ_in_a_shared_setting_get_different_packs(tiny_gemma_dir, unified_data):
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.pack_groups import group_key

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora"]
    a, b, c = (load_config(TrialConfig, None, common + extra) for extra in
               (["qlora.bits=4", "learning_rate=1e-4"], ["qlora.bits=4", "learning_rate=3e-5"], ["qlora.bits=8"]))  # fmt: skip
    assert group_key(a) == group_key(b) != group_key(c)  # the learning rate is a trial's own, the base's bits are shared
