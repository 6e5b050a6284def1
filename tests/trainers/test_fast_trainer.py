"""When the GPU fast path applies (CPU-checkable parts; the path itself is tested in test_fast_path_gpu.py)."""

from __future__ import annotations

import pytest

from duetto.config import load_config
from duetto.trainers.config import TrialConfig
from duetto.trainers.fast_trainer import fast_path_blocker


@pytest.mark.parametrize(("overrides", "on_gpu", "world", "reason"), [
    ([], True, 1, None),
    (["method=galore"], True, 1, None),
    (["cuda_graphs=false"], True, 1, "cuda_graphs=false"),
    ([], False, 1, "no CUDA device"),
    (["method=galore", "galore.layerwise=false"], True, 2, "DDP (several workers)"),
    (["gradient_accumulation_steps=2"], True, 1, "gradient accumulation"),
    (["compile=true"], True, 1, "compile=true"),
    (["method=galore", "galore.proj_type=full"], True, 1, "galore.proj_type=full has no fused optimizer"),
])  # fmt: skip
def test_fast_path_blocker(overrides, on_gpu, world, reason):
    cfg = load_config(TrialConfig, None, overrides)
    assert fast_path_blocker(cfg, on_gpu=on_gpu, world_size=world) == reason


def test_step_clock_sums_steps_on_cpu(monkeypatch):
    import torch

    from duetto.trainers import trial_reports
    from duetto.trainers.trial_reports import StepClock

    now = [0.0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trial_reports.time, "perf_counter", lambda: now[0])
    clock = StepClock()
    for _ in range(2):
        clock.begin()
        now[0] += 0.25  # a step
        clock.end()
        now[0] += 10.0  # between steps (evaluation, saving): not counted
    clock.end()  # an end without a begin adds nothing
    assert clock.seconds() == 0.5
