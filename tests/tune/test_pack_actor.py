"""The pack actor's bookkeeping (tune/packing.py PackActor), run in this process: a failed step ends
only the trials that took part in it, and a restarted trial takes its earlier attempt's place."""

from __future__ import annotations

import threading

import pytest


def _cfg(tiny_gemma_dir, unified_data, tmp_path, seed: int, interim: int = 0, steps: int = 4) -> dict:
    from duetto.config import load_config, to_dict
    from duetto.trainers.config import TrialConfig

    train, test = unified_data
    return to_dict(load_config(TrialConfig, None, [
        f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
        "batch_size=2", f"max_steps={steps}", "report_every_steps=2", f"interim_eval_examples={interim}", "eval.num_examples=2",
        "eval.max_new_tokens=4", "eval.loss_examples=4", f"seed={seed}", f"output_dir={tmp_path / str(seed)}"]))  # fmt: skip


def _in_thread(fn, *args):
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the call never returned"
    return out


def test_a_failed_step_ends_only_its_trials_and_a_restart_takes_the_old_place(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.tune.packing import PackActor

    actor = PackActor.__ray_metadata__.modified_class("cpu")
    actor.join("a", _cfg(tiny_gemma_dir, unified_data, tmp_path, 1))
    actor.join("b", _cfg(tiny_gemma_dir, unified_data, tmp_path, 2))
    real, failed = actor.pack.step, []

    def fails_once():
        if not failed:
            failed.append(True)
            raise RuntimeError("CUDA out of memory")
        return real()

    actor.pack.step = fails_once
    out = _in_thread(actor.advance, "a", 2)  # only a runs (b waits at step 0): the failed step was a's alone
    assert isinstance(out.get("error"), RuntimeError) and actor.attached() == ["b"]
    assert _in_thread(actor.advance, "b", 2)["value"]["step"] == 2  # the pack goes on with b
    # a restarted trial joins under its old key and takes its earlier attempt's place
    again = actor.join("b", _cfg(tiny_gemma_dir, unified_data, tmp_path, 2))
    assert again == {"total": 4, "step": 0} and actor.attached() == ["b"] and len(actor.pack.trials) == 1
    assert _in_thread(actor.advance, "b", 4)["value"] == {"step": 4}
    assert actor.finish("b")["step"] == 4 and actor.attached() == []


def test_reports_due_at_the_same_step_are_made_in_one_pass(tmp_path, tiny_gemma_dir, unified_data):
    import time

    from duetto.tune.packing import PackActor

    actor = PackActor.__ray_metadata__.modified_class("cpu")
    actor.join("a", _cfg(tiny_gemma_dir, unified_data, tmp_path, 1, interim=2))
    actor.join("b", _cfg(tiny_gemma_dir, unified_data, tmp_path, 2, interim=2))
    calls, real = [], actor.pack.interim_reports
    actor.pack.interim_reports = lambda ts: calls.append(sorted(ts)) or real(ts)
    with actor.cond:  # both clients asked for their report at step 2 (as two advance calls would)
        for t in actor.keys.values():
            actor.pack.trials[t].until = 2
        actor.cond.notify_all()
    deadline = time.time() + 60
    while any(tr.step < 2 for tr in actor.pack.trials.values()) and time.time() < deadline:
        time.sleep(0.05)
    ra, rb = actor.advance("a", 2), actor.advance("b", 2)
    assert calls == [[0, 1]]  # one pass made both reports; b's waited for its client
    assert ra["step"] == rb["step"] == 2 and {"bleu4", "rougeL"} <= ra.keys() & rb.keys()
    assert actor.advance("a", 4) == {"step": 4} and actor.advance("b", 4) == {"step": 4}


def test_a_lagging_trial_gets_the_report_of_its_own_step(tmp_path, tiny_gemma_dir, unified_data):
    """b took its report at step 2 and has not asked for the next one while a reports at 4: b's next
    report is made at its own step 4, never a second one at 2 kept for later."""
    from duetto.tune.packing import PackActor

    actor = PackActor.__ray_metadata__.modified_class("cpu")
    actor.join("a", _cfg(tiny_gemma_dir, unified_data, tmp_path, 1, interim=2, steps=6))
    actor.join("b", _cfg(tiny_gemma_dir, unified_data, tmp_path, 2, interim=2, steps=6))
    assert actor.advance("a", 2)["step"] == 2 and actor.advance("b", 2)["step"] == 2
    assert actor.advance("a", 4)["step"] == 4 and not actor.reports  # b, waiting at 2, was not due again
    assert actor.advance("b", 4)["step"] == 4
