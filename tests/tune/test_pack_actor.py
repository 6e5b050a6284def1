"""The pack actor's bookkeeping without a Ray cluster (its class called directly): trials that have
taken their last step are finished together, each client then gets its own metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _actor_with_two_trials_at_their_end(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.config import load_config, to_dict
    from duetto.trainers.config import TrialConfig
    from duetto.tune.packing import PackActor

    train, test = unified_data
    actor = PackActor.__ray_actor_class__("cpu")
    for key, seed in (("a", 1), ("b", 2)):
        cfg = load_config(TrialConfig, None, [
            f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
            "batch_size=4", "max_steps=3", "report_every_steps=0", "interim_eval_examples=0", "eval.num_examples=2",
            "eval.max_new_tokens=4", "eval.loss_examples=8", f"seed={seed}", f"output_dir={tmp_path / key}"])  # fmt: skip
        assert actor.join(key, to_dict(cfg)) == {"total": 3, "step": 0}
        assert actor.advance(key, 3) == {"step": 3}
    return actor


def test_trials_at_their_last_step_finish_together(tmp_path, tiny_gemma_dir, unified_data):
    actor = _actor_with_two_trials_at_their_end(tmp_path, tiny_gemma_dir, unified_data)
    a = actor.finish("a")
    assert not actor.pack.trials and set(actor.finished) == {actor.keys["b"]}  # b finished beside a
    b = actor.finish("b")
    assert not actor.finished and not actor.keys
    for key, m in (("a", a), ("b", b)):
        saved = json.loads(Path(tmp_path, key, "metrics.json").read_text())
        assert m["done"] and m["step"] == 3 and saved["eval_loss"] == m["eval_loss"]
    assert a["eval_loss"] != b["eval_loss"]  # each its own seed's adapter


def test_a_failed_finish_gives_its_slot_back(tmp_path, tiny_gemma_dir, unified_data, monkeypatch):
    """Finishing together fails, then finishing alone fails too: the trial's client gets the error and
    the trial leaves the pack (its slot and adapter freed); the other trial still finishes."""
    actor = _actor_with_two_trials_at_their_end(tmp_path, tiny_gemma_dir, unified_data)
    a, b = actor.keys["a"], actor.keys["b"]
    finish_all = actor.pack.finish_all

    def fails_for_a(ts):
        if a in ts:
            raise RuntimeError("out of memory")
        return finish_all(ts)

    monkeypatch.setattr(actor.pack, "finish_all", fails_for_a)
    with pytest.raises(RuntimeError, match="out of memory"):
        actor.finish("a")
    assert a not in actor.pack.trials and b in actor.pack.trials and "a" not in actor.keys
    assert actor.finish("b")["done"] and not actor.pack.trials
