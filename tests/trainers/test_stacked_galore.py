"""Stacked GaLore trials (trainers/stacked_galore.py) on the tiny CPU models: each trial of a stack
trains as `duetto train` trains it alone (same init, data order, optimizer, schedule, outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _common(model_dir, data, **over):
    train, test = data
    items = {"model": model_dir, "data.train": train, "data.test": test, "method": "galore", "max_seq_len": 64,
             "batch_size": 2, "max_steps": 6, "logging_steps": 1, "report_every_steps": 0, "interim_eval_examples": 0,
             "eval.num_examples": 2, "eval.max_new_tokens": 4, "eval.loss_examples": 8, "scaling.num_workers": 0,
             "warmup_ratio": 0.2, "galore.rank": 8, "galore.update_proj_gap": 3, "gradient_checkpointing": False}  # fmt: skip
    items.update(over)
    return [f"{k}={v}" for k, v in items.items()]


def _cfg(common, variant, out):
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig

    return load_config(TrialConfig, None, common + variant + [f"output_dir={out}"])


def test_stacked_losses_are_each_models_own_loss(tiny_gemma_dir):
    """Three models' stacked losses and gradients are those of each model run alone (with its attention
    mask on right-padded rows); a slot without labels has loss 0 and no gradient."""
    import copy

    from transformers import AutoModelForCausalLM

    from duetto.trainers.stacked_galore import StackedWeights, stacked_losses

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    models = []
    for i in range(3):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02 * (i + 1))
        models.append(m)
    alone = copy.deepcopy(models)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (3, 2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 1, 11:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :, :4] = -100  # the prompt is not scored
    labels[2] = -100  # slot 2 waits: no labels
    stack = StackedWeights(models)
    skeleton = copy.deepcopy(base)
    losses = stacked_losses(skeleton, stack.tensors, dict(skeleton.named_buffers()), ids, labels)
    losses.sum().backward()
    stack.hand_out_grads(range(len(models)))
    for i in range(2):
        ref = alone[i](input_ids=ids[i], attention_mask=mask[i], labels=labels[i]).loss
        ref.backward()
        assert float(losses[i].detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        for (name, p), (_, q) in zip(models[i].named_parameters(), alone[i].named_parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), (i, name)
    assert float(losses[2].detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in models[2].parameters())
    # the models read their slots: a write to the stack is a write to the model
    name, first = next(iter(models[1].named_parameters()))
    with torch.no_grad():
        stack.tensors[name][1].add_(1.0)
    assert torch.equal(first, stack.tensors[name][1])


@pytest.mark.parametrize("model_dir", ["tiny_gemma_dir", "tiny_smollm_dir"])
def test_stacked_trials_follow_their_solo_duetto_train_runs(model_dir, request, tmp_path, unified_data):
    """Two GaLore configs (different seed, lr, rank, gap, layer-wise or not, steps) trained stacked:
    each trial's loss curve, eval loss, answers and saved model are those `duetto train` gives it alone."""
    from safetensors.torch import load_file

    from duetto.trainers.packed_run import train_packed
    from duetto.trainers.trial import run_trial

    common = _common(request.getfixturevalue(model_dir), unified_data)
    variants = [["seed=1", "learning_rate=3e-3", "galore.layerwise=true"],
                ["seed=7", "learning_rate=1e-3", "galore.rank=4", "galore.update_proj_gap=2", "galore.scale=0.5",
                 "galore.layerwise=false", "weight_decay=0.1", "max_steps=4"]]  # fmt: skip
    solo = [run_trial(_cfg(common, v, tmp_path / str(i))) for i, v in enumerate(variants)]
    stacked = train_packed([_cfg(common, v, tmp_path / f"s{i}") for i, v in enumerate(variants)], torch.device("cpu"))
    curves = [[loss for _, loss in m["train_loss_curve"]] for m in stacked]
    assert len(curves[0]) == 6 and len(curves[1]) == 4  # the shorter trial left after its 4 steps
    for t in range(2):
        assert curves[t] == pytest.approx([loss for _, loss in solo[t]["train_loss_curve"]], rel=1e-4), t
        assert stacked[t]["eval_loss"] == pytest.approx(solo[t]["eval_loss"], rel=1e-4), t
        assert stacked[t]["step"] == solo[t]["step"] and stacked[t]["trained_tokens"] == solo[t]["trained_tokens"]
        assert (stacked[t]["bleu4"], stacked[t]["rougeL"]) == pytest.approx((solo[t]["bleu4"], solo[t]["rougeL"]), abs=1e-6)
        assert stacked[t]["total_params"] == solo[t]["total_params"]
        assert stacked[t]["fast_path"].startswith("stacked: ")
        # refreshes at steps 0, 2 and 3 (of one trial or the other): part of its steps' time, not all
        assert 0 < stacked[t]["refresh_step_seconds"] < stacked[t]["phase_seconds"]["train"]
        mine = load_file(str(tmp_path / f"s{t}" / "model" / "model.safetensors"))
        theirs = load_file(str(Path(solo[t]["model_dir"]) / "model.safetensors"))
        assert set(mine) == set(theirs)
        # the stack's batched matmuls sum in another order; where that flips the rounding of an 8-bit
        # Adam state, a weight's update moves by a fraction of one step (lr): less than one step at
        # most, and nothing on average
        lr = (3e-3, 1e-3)[t]
        for key in theirs:
            d = (mine[key] - theirs[key]).abs()
            assert float(d.max()) < lr and float(d.mean()) < 1e-5, (t, key, float(d.max()), float(d.mean()))
    assert curves[0][:4] != pytest.approx(curves[1], rel=1e-3)  # the two trials really differ


def test_a_stacked_trial_saved_midway_goes_on_as_if_it_never_stopped(tmp_path, tiny_smollm_dir, unified_data):
    """GaloreStack.state at step 3 (beside another trial), a new stack joined from it: the last steps'
    losses, the eval loss and the weights are those of the trial trained 6 steps without a stop."""
    from duetto.config import ConfigError
    from duetto.trainers.stacked_galore import GaloreStack

    common = _common(tiny_smollm_dir, unified_data, seed=3, learning_rate=3e-3)
    whole = GaloreStack(torch.device("cpu"))
    whole.join(_cfg(common, [], tmp_path / "whole"))
    while whole.step():
        pass
    want = whole.finish(0)

    first = GaloreStack(torch.device("cpu"))
    t = first.join(_cfg(common, [], tmp_path / "parts"), until=3)
    first.join(_cfg(common, ["seed=9"], tmp_path / "other"), until=5)  # a neighbour that runs on past it
    while first.step():
        pass
    state = first.state(t)
    second = GaloreStack(torch.device("cpu"))
    t2 = second.join(_cfg(common, [], tmp_path / "parts"), state=state)
    assert second.trials[t2].step == 3
    while second.step():
        pass
    got = second.finish(t2)
    assert got["resumed_from_step"] == 3
    assert [x for _, x in got["train_loss_curve"]] == pytest.approx([x for _, x in want["train_loss_curve"]], rel=1e-5)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="other settings"):
        GaloreStack(torch.device("cpu")).join(_cfg(common, ["max_seq_len=32"], tmp_path / "x"), state=state)


def test_galore_and_qlora_trials_do_not_pack_together(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.config import ConfigError
    from duetto.trainers.pack_groups import check_packable

    common = _common(tiny_gemma_dir, unified_data)
    galore = _cfg(common, [], tmp_path / "g")
    qlora = _cfg(common, ["method=qlora"], tmp_path / "q")
    with pytest.raises(ConfigError, match="all qlora or all galore"):
        check_packable([galore, qlora])
    check_packable([galore, _cfg(common, ["galore.rank=4", "learning_rate=1e-2"], tmp_path / "g2")])  # optimizer settings may differ
    with pytest.raises(ConfigError, match="max_seq_len"):
        check_packable([galore, _cfg(common, ["max_seq_len=32"], tmp_path / "g3")])


def test_a_cpu_stack_with_bf16_mixed_trains_in_float32(tmp_path, tiny_gemma_dir, unified_data):
    """``precision: bf16-mixed`` on a CPU: the stack steps and evaluates without CPU autocast (its
    stacked forward under vmap cannot take it) and trains to finite losses."""
    import math

    from duetto.trainers.packed_run import train_packed

    common = _common(tiny_gemma_dir, unified_data, max_steps=2, precision="bf16-mixed")
    cfgs = [_cfg(common, [f"seed={i}"], tmp_path / str(i)) for i in range(2)]
    for m in train_packed(cfgs, torch.device("cpu")):
        assert len(m["train_loss_curve"]) == 2 and all(math.isfinite(loss) for _, loss in m["train_loss_curve"])
        assert math.isfinite(m["eval_loss"])


@pytest.mark.parametrize("rows_per_pass", [None, 3])
def test_stacked_eval_losses_equal_each_trials_own(tmp_path, tiny_smollm_dir, unified_data, monkeypatch, rows_per_pass):
    """Trials that evaluate on the same rows share each evaluation batch in one stacked forward, in eval
    mode: each gets the eval loss of its own model's pass, a short last batch included, also when a
    batch's rows go through in parts, when only some stacked trials are asked, and when a trial joined
    since the last step; a trial on other rows evaluates on its own."""
    from duetto.trainers.stacked_galore import GaloreStack

    common = _common(tiny_smollm_dir, unified_data, max_steps=3, learning_rate=5e-2, **{"eval.loss_examples": 11})
    variants = [["seed=4", "eval.loss_examples=5"], ["seed=1"], ["seed=2", "galore.rank=4"], ["seed=3", "galore.layerwise=false"]]
    stack = GaloreStack(torch.device("cpu"))
    if rows_per_pass:
        monkeypatch.setattr(GaloreStack, "_rows_per_eval_pass", lambda self, slots, rows, length: rows_per_pass)
    ids = [stack.join(_cfg(common, v, tmp_path / str(i))) for i, v in enumerate(variants)]
    while stack.step():
        pass
    for layer in stack.skeleton.model.layers:  # dropout the stacked forward must not apply in evaluation
        layer.self_attn.attention_dropout = 0.5
    alone = {t: stack.eval_loss(t) for t in ids}
    assert len(set(alone.values())) == len(ids)  # the trials learned apart: each loss is really its own
    assert stack.eval_losses(ids) == pytest.approx(alone, rel=1e-5)
    assert stack.eval_losses([ids[3], ids[2]]) == pytest.approx({t: alone[t] for t in ids[2:]}, rel=1e-5)
    assert stack.skeleton.training  # the stacked forward is back in training mode for the next step
    late = stack.join(_cfg(common, ["seed=9"], tmp_path / "late"))  # the stack is stale until it restacks
    assert stack.eval_losses([ids[1], late]) == pytest.approx({ids[1]: alone[ids[1]], late: stack.eval_loss(late)}, rel=1e-5)


def test_a_stacked_evaluation_pass_takes_as_many_rows_as_a_quarter_of_free_or_cached_gpu_memory_holds(monkeypatch):
    from types import SimpleNamespace

    from duetto.trainers.stacked_galore import GaloreStack

    stack = GaloreStack(torch.device("cuda"), memory=object())  # nothing here touches a GPU
    stack.skeleton = SimpleNamespace(config=SimpleNamespace(vocab_size=1000, num_attention_heads=4))
    # a row of 128 tokens in each of 4 slots: logits (bf16, float copy, log-softmax) and one layer's scores
    one_row = 4 * 128 * (1000 * 10 + 4 * 128 * 6)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 5 * one_row + 7, 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert stack._rows_per_eval_pass(4, 32, 128) == 5
    assert stack._rows_per_eval_pass(4, 3, 128) == 3
    # memory the caching allocator holds but no tensor uses counts as free
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * 3 * one_row)
    assert stack._rows_per_eval_pass(4, 32, 128) == 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10, 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    assert stack._rows_per_eval_pass(4, 32, 128) == 1  # a row at a time at worst
    assert GaloreStack(torch.device("cpu"))._rows_per_eval_pass(4, 8, 64) == 8
