"""Packed LoRA trials (trainers/packed_lora.py) on the tiny CPU model: each trial in a pack trains
exactly as it does alone under PEFT (same initial adapter, same batches, same optimizer)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from duetto.trainers.packed_lora import (
    LoraSpec,
    PackedTrials,
    TrialOptim,
    load_peft_adapter,
    pack_lora,
    peft_adapter_state,
)

TARGETS = ["q_proj", "v_proj"]


def _batches(seed: int, steps: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # a padded row
        labels = ids.clone()
        labels[:, :5] = -100  # the prompt is not scored
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _solo(base, spec: LoraSpec, optim: TrialOptim, batches, seed: int):
    """The reference: PEFT's LoRA on its own copy of the base, one plain training loop."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                            target_modules=TARGETS))  # fmt: skip
    from peft import get_peft_model_state_dict

    init = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": optim.weight_decay}], lr=optim.learning_rate)
    sched = get_scheduler(optim.scheduler, opt, num_warmup_steps=optim.warmup_steps, num_training_steps=optim.total_steps)
    losses = []
    model.train()
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return init, losses, get_peft_model_state_dict(model)


def test_each_packed_trial_trains_as_it_does_alone(tiny_gemma_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    vocab = base.config.vocab_size
    specs = [LoraSpec(r=4, alpha=8), LoraSpec(r=8, alpha=32), LoraSpec(r=2, alpha=2)]
    optims = [TrialOptim(learning_rate=3e-3, total_steps=6, warmup_steps=1),
              TrialOptim(learning_rate=1e-3, weight_decay=0.1, total_steps=6),
              TrialOptim(learning_rate=5e-3, total_steps=6, max_grad_norm=0.5, scheduler="cosine")]  # fmt: skip
    data = [_batches(10 + t, 6, vocab) for t in range(3)]
    solo = [_solo(base, s, o, d, seed=t) for t, (s, o, d) in enumerate(zip(specs, optims, data))]

    model = copy.deepcopy(base)
    layers = pack_lora(model, TARGETS, specs)
    for t, (init, _, _) in enumerate(solo):
        load_peft_adapter(layers, t, init)
    trials = PackedTrials(layers, optims)
    model.train()
    losses = [trials.step(model, {t: data[t][i] for t in range(3)}) for i in range(6)]

    for t, (_, want_losses, want_state) in enumerate(solo):
        assert [step[t] for step in losses] == pytest.approx(want_losses, rel=1e-5, abs=1e-6), t
        got = peft_adapter_state(layers, t)
        assert set(got) == set(want_state)
        for key, value in want_state.items():
            assert torch.allclose(got[key], value, atol=1e-6), (t, key)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)  # the base is frozen


def test_a_step_that_clips_every_stacked_trial_inside_trains_as_the_eager_step(tiny_gemma_dir):
    """A captured pack step clips every stacked trial's gradients after backward (PackedTrials.clip),
    those of trials without a batch too; their zero gradients stay zero, so trial by trial the weights
    equal those of eager steps that clip only the trials that step."""
    from transformers import AutoModelForCausalLM

    from duetto.trainers.packed_lora import set_slices

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    vocab = base.config.vocab_size
    specs = [LoraSpec(r=4, alpha=8), LoraSpec(r=8, alpha=32), LoraSpec(r=2, alpha=2)]
    data = [_batches(20 + t, 4, vocab) for t in range(3)]
    # max_grad_norm small enough that every step clips
    optims = lambda: [TrialOptim(learning_rate=3e-3, total_steps=4, max_grad_norm=0.05) for _ in specs]  # noqa: E731
    # trial 1 sits out steps 1 and 3: it has a block of unlabelled rows there
    plan = [{0, 1, 2}, {0, 2}, {0, 1, 2}, {0, 2}]
    runs = []
    for inside in (False, True):
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        layers = pack_lora(model, TARGETS, specs)
        trials = PackedTrials(layers, optims())
        model.train()

        def forward_backward(order, bounds, joined, trials=trials, model=model, layers=layers):
            set_slices(layers, [(t, bounds[i], bounds[i + 1]) for i, t in enumerate(order)])
            losses = trials.losses(model, joined, len(order))
            losses.sum().backward()
            trials.clip(order)
            return losses.detach()

        losses = [trials.step(model, {t: data[t][i] for t in plan[i]}, forward_backward if inside else None)
                  for i in range(4)]  # fmt: skip
        runs.append((losses, [peft_adapter_state(layers, t) for t in range(3)]))
        held = trials  # the last run's (clips inside): its idle trial 1 kept views of the gradients
    (eager_losses, eager_states), (inside_losses, inside_states) = runs
    assert eager_losses == inside_losses
    for t in range(3):
        for key, value in eager_states[t].items():
            assert torch.equal(inside_states[t][key], value), (t, key)
    # a restack (a trial joins or leaves) drops every trial's views, which would keep the old stacked
    # gradients allocated
    assert all(p.grad is not None for p in held.params[1])
    held.remove(2)
    assert all(p.grad is None for params in held.params.values() for p in params)


def test_a_packed_layer_needs_its_row_slices(tiny_gemma_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    layers = pack_lora(model, TARGETS, [LoraSpec(r=2, alpha=4)])
    with pytest.raises(RuntimeError, match="set_slices"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="no linear layer"):
        pack_lora(AutoModelForCausalLM.from_pretrained(tiny_gemma_dir), ["nope"], [LoraSpec(r=2, alpha=4)])
    assert len(layers) == 2 * model.config.num_hidden_layers


def test_packed_trials_follow_their_solo_duetto_train_loss_curves(tmp_path, tiny_gemma_dir, unified_data):
    """Two QLoRA configs (different seed, lr, rank, alpha) trained together: each trial's per-step loss
    is the one `duetto train` logs for that config alone (its LoRA init, data order, AdamW, schedule)."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import train_packed
    from duetto.trainers.trial import run_trial

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=4", "max_steps=6", "logging_steps=1", "report_every_steps=0", "interim_eval_examples=0",
              "eval.num_examples=2", "eval.max_new_tokens=4", "eval.loss_examples=8", "scaling.num_workers=0",
              "qlora.dropout=0.0", "warmup_ratio=0.2"]  # fmt: skip
    variants = [["seed=1", "learning_rate=3e-3", "qlora.r=8", "qlora.alpha=16"],
                ["seed=7", "learning_rate=1e-3", "qlora.r=4", "qlora.alpha=32", "weight_decay=0.1", "max_steps=4"]]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + v + [f"output_dir={tmp_path / str(i)}"]) for i, v in enumerate(variants)]
    solo = [run_trial(c) for c in cfgs]
    packed_cfgs = [load_config(TrialConfig, None, common + v + [f"output_dir={tmp_path / f'p{i}'}"])
                   for i, v in enumerate(variants)]  # fmt: skip
    packed = train_packed(packed_cfgs, torch.device("cpu"))
    curves = [[loss for _, loss in m["train_loss_curve"]] for m in packed]
    for t in range(2):
        assert curves[t] == pytest.approx([loss for _, loss in solo[t]["train_loss_curve"]], rel=1e-4), t
        assert packed[t]["eval_loss"] == pytest.approx(solo[t]["eval_loss"], rel=1e-4), t
        assert (packed[t]["bleu4"], packed[t]["rougeL"]) == pytest.approx((solo[t]["bleu4"], solo[t]["rougeL"]), abs=1e-6)
        # the saved adapters are PEFT's: same files, same tensors as the solo trial saved
        from safetensors.torch import load_file

        mine = load_file(str(tmp_path / f"p{t}" / "model" / "adapter_model.safetensors"))
        theirs = load_file(str(Path(solo[t]["model_dir"]) / "adapter_model.safetensors"))
        assert set(mine) == set(theirs)
        for key in theirs:
            assert torch.allclose(mine[key], theirs[key], atol=1e-5), (t, key)
    for t in range(2):  # a trial alone's phases, plus the pack's own: where its wall time went
        phases = packed[t]["phase_seconds"]
        assert phases.keys() == set(solo[t]["phase_seconds"]) | {"interim_reports", "waiting"}
        assert min(phases.values()) >= 0 and phases["setup"] > 0 and phases["generation"] > 0
        assert phases["train"] >= packed[t]["train_seconds"] > 0  # the steps, with their batches' collation
    assert len(curves[0]) == 6 and len(curves[1]) == 4  # the shorter trial left the pack after its 4 steps
    assert curves[0][:4] != pytest.approx(curves[1], rel=1e-3)  # the two trials really differ


def test_a_pack_steps_its_trials_in_lockstep_and_waits_a_while_for_those_behind():
    from duetto.trainers.packed_run import LOCKSTEP_HOLD_SECONDS, Pack, PackedTrial

    pack = Pack(torch.device("cpu"))

    def trial(step: int, until: int, total: int = 10) -> PackedTrial:
        return PackedTrial(None, None, None, iter(()), total, step=step, until=until)

    # 0 waits at its report (step 4), 1 is behind and may step, 3 is done
    pack.trials = {0: trial(4, 4), 1: trial(2, 4), 3: trial(10, 10)}
    assert pack.to_step(0.0) == ([1], None)  # the trial furthest behind steps; none ahead of it does
    pack.trials[1].step = 4
    assert pack.to_step(1.0) == ([], None)  # nothing may step: wait until a client moves a trial on
    pack.trials[0].until = 6
    assert pack.to_step(2.0) == ([], LOCKSTEP_HOLD_SECONDS)  # 0 waits for 1, still at its report
    assert pack.to_step(2.0 + LOCKSTEP_HOLD_SECONDS - 1) == ([], 1.0)
    assert pack.to_step(2.0 + LOCKSTEP_HOLD_SECONDS) == ([0], None)  # then it steps without it
    pack.trials[0].step = 5
    pack.trials[1].until = 6
    assert pack.to_step(40.0) == ([1], None)  # 1 is moved on: it catches up while 0 waits
    pack.trials[1].step = 5
    assert pack.to_step(41.0) == ([0, 1], None)  # and from there they step together
    # a trial behind others waits at a report: those ahead wait for it, a while, and not again
    pack.trials[2] = trial(3, 3)
    assert pack.to_step(42.0) == ([], LOCKSTEP_HOLD_SECONDS)
    assert pack.to_step(42.0 + LOCKSTEP_HOLD_SECONDS) == ([0, 1], None)
    pack.trials[0].step = pack.trials[1].step = 6  # both at their reports: nothing may step
    assert pack.to_step(80.0) == ([], None)
    pack.trials[0].until = 8
    assert pack.to_step(81.0) == ([0], None)  # still 2 at step 3: its wait ran out, it is not waited for again
    del pack.trials[2]  # it leaves (Tune stopped it): 0 and 1 are the trials furthest behind
    pack.trials[0].step = 6
    assert pack.to_step(90.0) == ([], LOCKSTEP_HOLD_SECONDS)  # 0 waits for 1, at its report, afresh


class _FakeGpuMemory:
    """GPU memory as a pack reads it: the base takes 1,000 bytes, each stepping trial 1,000 more."""

    def __init__(self):
        self.pack = None

    def total(self) -> int:
        return 10_000

    def allocated(self) -> int:
        return 1_000

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return 1_000 + 1_000 * len(self.pack.runnable())


def test_a_pack_admits_trials_by_the_memory_its_steps_measured(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import Pack

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=2", "max_steps=3", "report_every_steps=0", "interim_eval_examples=0", "eval.num_examples=2",
              "eval.max_new_tokens=4", "eval.loss_examples=4", "scaling.num_workers=0"]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + [f"seed={i}", f"output_dir={tmp_path / str(i)}"]) for i in range(3)]
    meter = _FakeGpuMemory()
    # budget 4,500 of 10,000: the base (1,000), a joining trial's build of another (1,000) and two
    # trials (1,000 each) fit, three do not
    pack = meter.pack = Pack(torch.device("cpu"), memory_fraction=0.45, memory=meter)
    assert pack.has_room() and pack.capacity() is None
    a = pack.join(cfgs[0])
    assert not pack.has_room()  # nothing measured yet: one trial at a time
    pack.step()
    assert (pack.base_bytes, pack.trial_bytes, pack.capacity()) == (1_000, 1_000, 2) and pack.has_room()
    b = pack.join(cfgs[1])
    assert not pack.has_room()
    pack.step()
    assert pack.trial_bytes == 1_000 and not pack.has_room()
    pack.leave(b)
    assert pack.has_room()
    layer = next(iter(pack.layers.values()))
    assert not list(layer.lora_A[b].parameters()) and list(layer.lora_A[a].parameters())  # b's adapter freed
    while pack.step():
        pass
    assert pack.finish(a)["peak_memory_bytes"] == 3_000  # the highest step peak: two trials stepping
    counted = Pack(torch.device("cpu"), max_trials=1)  # CPU: no memory to measure, only the count
    assert counted.memory is None and counted.has_room()
    counted.join(cfgs[2])
    assert not counted.has_room() and counted.capacity() is None


def test_a_pack_on_cuda_graphs_counts_each_kept_graph_against_memory(monkeypatch):
    """Each graph a pack keeps (GRAPHS_KEPT) holds a step's activations: its capacity divides the
    budget by that many times a trial's measured share, unless the trials turn graphs off."""
    from duetto.trainers.packed_run import GRAPHS_KEPT, Pack

    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: None)
    meter = _FakeGpuMemory()
    pack = Pack(torch.device("cuda"), memory_fraction=0.9, memory=meter)  # never steps: no GPU needed
    pack.base_bytes, pack.trial_bytes = 1_000, 100
    assert pack.uses_graphs() and pack.capacity() == (9_000 - 2_000) // (100 * GRAPHS_KEPT)
    pack.graph_blocker = "LLM.int8 layers: ..."
    assert not pack.uses_graphs() and pack.capacity() == 70


def test_scaling_tensors_made_while_decoding_can_train():
    """A rank group's scalings first asked for under inference_mode (the packed trials' reports decode
    there) become a plain tensor: a later training step saves it for backward."""
    from duetto.trainers.packed_lora import _on_device

    with torch.inference_mode():
        s = _on_device((0.125, 8.5), torch.device("cpu"), (-1, 1, 1))
    assert not s.is_inference()
    w = torch.ones(2, 1, 1, requires_grad=True)
    (w * s).sum().backward()
    assert w.grad.flatten().tolist() == [0.125, 8.5]


def test_a_packed_trial_saved_midway_goes_on_as_if_it_never_stopped(tmp_path, tiny_gemma_dir, unified_data):
    """Pack.state at step 3, a new pack joined from it: the last steps' losses, the eval loss and the
    adapter are those of the trial trained 6 steps without a stop (its AdamW, schedule, data order)."""
    from duetto.config import ConfigError, load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import Pack

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=4", "max_steps=6", "logging_steps=1", "report_every_steps=0", "interim_eval_examples=0",
              "eval.num_examples=2", "eval.max_new_tokens=4", "eval.loss_examples=8", "scaling.num_workers=0",
              "qlora.dropout=0.0", "warmup_ratio=0.2", "seed=3", "learning_rate=3e-3", "qlora.r=8"]  # fmt: skip
    cfg = load_config(TrialConfig, None, common + [f"output_dir={tmp_path / 'whole'}"])
    whole = Pack(torch.device("cpu"))
    whole.join(cfg)
    while whole.step():
        pass
    want = whole.finish(0)

    cfg = load_config(TrialConfig, None, common + [f"output_dir={tmp_path / 'parts'}"])
    first = Pack(torch.device("cpu"))
    first.join(cfg, until=3)
    while first.step():
        pass
    first.trials[0].step_seconds += 1000.0  # as if the first attempt's steps had been slow
    state = first.state(0)
    second = Pack(torch.device("cpu"))
    t = second.join(cfg, state=state)
    assert second.trials[t].step == 3
    while second.step():
        pass
    got = second.finish(t)
    assert got["resumed_from_step"] == 3 and want["resumed_from_step"] == 0
    # tokens/s counts every attempt's steps; the phases split this attempt's wall time, from its join
    assert got["train_seconds"] > 1000 > got["wall_seconds"] >= got["phase_seconds"]["train"] > 0
    assert min(got["phase_seconds"].values()) >= 0
    assert sum(got["phase_seconds"].values()) == pytest.approx(got["wall_seconds"], rel=1e-6)
    assert [x for _, x in got["train_loss_curve"]] == pytest.approx([x for _, x in want["train_loss_curve"]], rel=1e-5)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
    assert got["trained_tokens"] == want["trained_tokens"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "model" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    other = load_config(TrialConfig, None, common + ["max_seq_len=32", f"output_dir={tmp_path / 'other'}"])
    fresh = Pack(torch.device("cpu"))
    with pytest.raises(ConfigError, match="other settings"):
        fresh.join(other, state=state)
    assert not fresh.trials  # the trial that failed to join holds no slot


def test_interim_reports_of_several_trials_decode_together_and_match_each_alone(tmp_path, tiny_gemma_dir, unified_data):
    """Three trials' interim answers in shared decoding calls (rows of different trials in one batch,
    each through its own adapter) give what each trial's report alone gives."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import Pack

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=2", "max_steps=6", "report_every_steps=3", "interim_eval_examples=5", "eval.batch_size=4",
              "eval.max_new_tokens=6", "eval.loss_examples=4", "scaling.num_workers=0", "learning_rate=5e-2"]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + [f"seed={i}", f"qlora.r={4 * (i + 1)}", f"output_dir={tmp_path / str(i)}"])
            for i in range(3)]  # fmt: skip
    pack = Pack(torch.device("cpu"))
    ids = [pack.join(c, until=3) for c in cfgs]
    while pack.step():
        pass
    alone = {t: pack.interim_report(t) for t in ids}
    before = {t: pack.trials[t].report_seconds for t in ids}
    together = pack.interim_reports(ids)
    for t in ids:
        assert together[t].keys() == alone[t].keys() >= {"bleu4", "rougeL", "eval_loss", "train_loss"}
        for key, value in alone[t].items():
            if key != "peak_memory_bytes":  # on CPU the process's high-water mark, which only grows
                assert together[t][key] == pytest.approx(value, abs=1e-6), (t, key)
    rose = {t: pack.trials[t].report_seconds - before[t] for t in ids}
    assert min(rose.values()) > 0 and len(set(rose.values())) == 1  # one shared report, counted whole for each
    # the trials learned apart (lr 5e-2): their answers differ, so each row really took its own adapter
    answers = pack._answers([(t, pack.trials[t].rows.generation(cfgs[0])[:5]) for t in ids])
    assert len({tuple(a) for a in answers.values()}) > 1


def test_decoding_calls_give_trials_with_as_many_rows_equal_blocks_and_fill_calls_otherwise():
    from duetto.trainers.packed_run import decode_calls

    # as many rows each: every call holds an equal block of each trial (the stacked adapters' case)
    assert decode_calls([(0, 200), (1, 200), (2, 200), (3, 200)], 1024) == [[(t, 0, 200) for t in range(4)]]
    assert decode_calls([(5, 5), (7, 5)], 4) == [[(5, 0, 2), (7, 0, 2)], [(5, 2, 4), (7, 2, 4)], [(5, 4, 5), (7, 4, 5)]]
    # other counts, or calls too small for a row of each: the rows fill calls of at most `total`, one trial after another
    assert decode_calls([(0, 5), (1, 3)], 4) == [[(0, 0, 4)], [(0, 4, 5), (1, 0, 3)]]
    assert decode_calls([(0, 3), (1, 3), (2, 3)], 2) == [[(0, 0, 2)], [(0, 2, 3), (1, 0, 1)], [(1, 1, 3)], [(2, 0, 2)], [(2, 2, 3)]]
    assert decode_calls([(0, 2), (1, 0), (2, 3)], 10) == [[(0, 0, 2), (2, 0, 3)]]
    assert decode_calls([], 4) == [] and decode_calls([(0, 0), (1, 0)], 4) == []


@pytest.mark.parametrize("batch", [0, 6], ids=["default-one-call", "calls-of-six-rows"])
def test_shared_decoding_gives_each_trial_the_answers_of_its_own_adapter_alone(tmp_path, tiny_gemma_dir, unified_data,
                                                                                monkeypatch, batch):  # fmt: skip
    """A pack's shared decoding calls give each trial the answers its adapter alone decodes; trials with as
    many rows share each call in equal blocks through the stacked adapters (with the default eval batch
    in one call, with eval.batch_size 6 in calls of 2 rows a trial), other row counts fill the calls."""
    from duetto.config import load_config
    from duetto.trainers import packed_lora
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.inference import generate_candidates, prompt_text
    from duetto.trainers.packed_run import Pack, only_trial

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=2", "max_steps=4", "report_every_steps=0", "interim_eval_examples=0", "eval.max_new_tokens=6",
              f"eval.batch_size={batch}", "scaling.num_workers=0", "learning_rate=5e-2"]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + [f"seed={i}", f"qlora.r={4 * (i + 1)}", f"output_dir={tmp_path / str(i)}"])
            for i in range(3)]  # fmt: skip
    pack = Pack(torch.device("cpu"))
    ids = [pack.join(c) for c in cfgs]
    while pack.step():
        pass

    def own(t, rows):
        prompts = [prompt_text(pack.tokenizer, cfgs[0].template, r["instruction"], r.get("input", "")) for r in rows]
        with only_trial(pack.base, pack.layers, t):
            return [c[0].text for c in generate_candidates(pack.base, pack.tokenizer, prompts, 1, max_new_tokens=6,
                                                           temperature=0.0, max_prompt_tokens=64, logprobs=False)]  # fmt: skip

    rows = pack.trials[ids[0]].rows.generation(cfgs[0])
    same = [(t, rows[:5]) for t in ids]
    other = [(ids[0], rows[:5]), (ids[1], rows[:3]), (ids[2], rows[2:7])]
    expected = {"same": {t: own(t, r) for t, r in same}, "other": {t: own(t, r) for t, r in other}}
    layouts, stacked = [], []
    real_set, real_delta = packed_lora.set_slices, packed_lora.PackedLoraLinear._stacked_delta
    monkeypatch.setattr(packed_lora, "set_slices", lambda layers, slices: (layouts.append(tuple(slices)), real_set(layers, slices))[1])
    monkeypatch.setattr(packed_lora.PackedLoraLinear, "_stacked_delta", lambda self, x, plan: (stacked.append(1), real_delta(self, x, plan))[1])
    assert pack._answers(same) == expected["same"]
    blocks = (5,) if batch == 0 else (2, 1)  # a trial's rows in a call: one call; or calls of 2, 2 and 1
    assert set(layouts) == {tuple((t, i * n, (i + 1) * n) for i, t in enumerate(ids)) for n in blocks}
    assert stacked  # equal blocks took the stacked adapters
    layouts.clear()
    assert pack._answers(other) == expected["other"]
    if batch:  # 13 rows filling calls of at most 6, one trial after another
        assert sorted({sum(stop - start for _, start, stop in lay) for lay in layouts}) == [1, 6]
    else:
        assert set(layouts) == {((ids[0], 0, 5), (ids[1], 5, 8), (ids[2], 8, 13))}
    assert len({tuple(a) for a in pack._answers(same).values()}) > 1  # the trials learned apart: each row took its own adapter


def test_a_shared_decoding_call_takes_each_trials_rows_of_a_call_alone_within_gpu_memory(monkeypatch):
    from types import SimpleNamespace

    from duetto.trainers.packed_run import Pack

    pack = Pack(torch.device("cuda"), memory=object())  # nothing here touches a GPU
    text = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                           hidden_size=16, intermediate_size=32, vocab_size=100)  # fmt: skip
    pack.base = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))
    # a row of 96 tokens: KV cache (2 layers x K and V x 1 head x 8 dims, bf16), one layer's prefill and
    # float attention scores, a step's float logits
    one_row = 2 * 2 * 1 * 8 * 96 * 2 + 96 * (3 * 32 + 4 * 16) * 2 + 4 * 96 * 96 * 4 + 100 * 4 * 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 700 * one_row + 9, 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * 300 * one_row)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert pack._decode_rows_that_fit(96) == 1000
    assert pack._default_decode_rows(3, 96) == 768  # 256 rows of each trial
    assert pack._default_decode_rows(4, 96) == 1000  # what memory holds
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10, 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    assert pack._decode_rows_that_fit(96) == 1
    assert pack._default_decode_rows(4, 96) == 256  # never fewer than a trial alone decodes in one call
    text.head_dim, text.num_attention_heads = None, 2  # head_dim from the hidden size: 16 / 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 700 * one_row + 9, 10**12))
    assert pack._decode_rows_that_fit(96) > 1000  # half the attention scores
    cpu = Pack(torch.device("cpu"))
    assert cpu._decode_rows_that_fit(96) >= 1 << 20 and cpu._default_decode_rows(3, 96) == 48


def test_eval_losses_in_shared_passes_equal_each_trials_own(tmp_path, tiny_gemma_dir, unified_data):
    """Trials that evaluate on the same rows share each evaluation batch (one block a trial, through its
    own adapter): each gets the eval loss of its own pass, a short last batch included; a trial on
    other rows evaluates on its own."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import Pack

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=2", "max_steps=4", "report_every_steps=0", "interim_eval_examples=0", "scaling.num_workers=0",
              "learning_rate=5e-2"]  # fmt: skip
    variants = [["qlora.r=4", "eval.loss_examples=11"], ["qlora.r=4", "eval.loss_examples=11"],
                ["qlora.r=8", "eval.loss_examples=11"], ["qlora.r=4", "eval.loss_examples=5"]]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + v + [f"seed={i}", f"output_dir={tmp_path / str(i)}"])
            for i, v in enumerate(variants)]  # fmt: skip
    pack = Pack(torch.device("cpu"))
    ids = [pack.join(c) for c in cfgs]
    while pack.step():
        pass
    alone = {t: pack.eval_loss(t) for t in ids}
    together = pack.eval_losses(ids)
    assert together == pytest.approx(alone, rel=1e-5)
    assert len(set(alone.values())) == len(ids)  # the trials learned apart: each loss is really its own


def test_a_shared_evaluation_pass_takes_as_many_trials_as_a_quarter_of_free_gpu_memory_holds(monkeypatch):
    from duetto.trainers.packed_run import Pack

    pack = Pack(torch.device("cuda"), memory=object())  # nothing here touches a GPU
    pack.base = torch.nn.Module()
    pack.base.get_output_embeddings = lambda: torch.nn.Linear(8, 1000, bias=False)  # a vocabulary of 1,000
    one_trial = 32 * 128 * 1000 * 6  # 32 rows of 128 tokens: bf16 logits and a block's float copy
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 3 * one_trial + 5, 10**12))
    assert pack._trials_per_eval_pass(8, 32, 128) == 3
    assert pack._trials_per_eval_pass(2, 32, 128) == 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10, 10**12))
    assert pack._trials_per_eval_pass(8, 32, 128) == 1  # one trial at a time, as each alone evaluates
    assert Pack(torch.device("cpu"))._trials_per_eval_pass(8, 8, 64) == 8


@pytest.mark.parametrize("ranks, alphas", [((4, 4, 8, 4), (8, 16, 8, 8)), ((4, 4, 4), (8, 8, 8))],
                         ids=["mixed-groups", "one-group"])
def test_batched_adapters_compute_what_one_trial_at_a_time_computes(tiny_gemma_dir, ranks, alphas):
    """Equal blocks run through the stacked adapters (here of mixed ranks, zero-padded to the largest,
    and scalings that differ; or all of one rank and scaling): the loss and every adapter gradient
    are those of running the trials' adapters one after another."""
    from transformers import AutoModelForCausalLM

    from duetto.trainers.packed_lora import hand_out_grads, set_slices, stack_adapters, stacked_tensors

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    model = copy.deepcopy(base)
    layers = pack_lora(model, TARGETS, [LoraSpec(r=r, alpha=a) for r, a in zip(ranks, alphas)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            for t in range(len(ranks)):
                layer.lora_B[t].weight.normal_(generator=g)  # B = 0 at init would hide the adapters
    stack_adapters(layers, range(len(ranks)))
    batch = _batches(3, 1, base.config.vocab_size)[0]
    ids = batch["input_ids"].repeat(len(ranks), 1)
    slices = [(t, 2 * t, 2 * t + 2) for t in range(len(ranks))]
    results = []
    for batched in (True, False):
        set_slices(layers, slices)
        if not batched:
            for layer in layers.values():
                layer.plan = None
        else:
            assert next(iter(layers.values())).plan is not None
        model.zero_grad(set_to_none=True)
        for p in stacked_tensors(layers):
            p.grad = None
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        if batched:  # the gradients went to the stacked adapters
            assert all(p.grad is None for layer in layers.values() for t in range(len(ranks)) for p in layer.adapter_params(t))
            hand_out_grads(layers, range(len(ranks)))
        grads = [p.grad.clone() for layer in layers.values() for t in range(len(ranks)) for p in layer.adapter_params(t)]
        results.append((logits.detach(), grads))
    (lb, gb), (ll, gl) = results
    torch.testing.assert_close(lb, ll, rtol=1e-5, atol=1e-6)
    for a, b in zip(gb, gl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_packs_answers_decode_on_its_dequantized_base_and_training_goes_on_quantized(tmp_path, tiny_gemma_dir,
                                                                                       unified_data, monkeypatch):  # fmt: skip
    """Inside dequantized_bnb_layers the pack's 4-bit base decodes on plain layers of its dequantized
    weights: the same greedy answers, each row through its own trial's adapter; on exit the quantized
    layers are back and the next step trains on them. On a GPU the pack picks that context while the
    dequantized weights fit, as a trial's final decoding does."""
    from duetto.config import load_config
    from duetto.models import dequantized_bnb_layers, dequantized_bytes
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import Pack

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=2", "max_steps=6", "report_every_steps=0", "interim_eval_examples=0", "eval.batch_size=4",
              "eval.max_new_tokens=6", "eval.loss_examples=4", "scaling.num_workers=0", "learning_rate=5e-2",
              "qlora.bits=4"]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + [f"seed={i}", f"output_dir={tmp_path / str(i)}"]) for i in range(2)]
    pack = Pack(torch.device("cpu"))
    ids = [pack.join(c, until=3) for c in cfgs]
    while pack.step():
        pass
    jobs = [(t, pack.trials[t].rows.generation(cfgs[0])[:4]) for t in ids]
    quantized = pack._answers(jobs)
    bnb_layers = lambda: sum(type(m).__module__.startswith("bitsandbytes") for m in pack.base.modules())  # noqa: E731
    before = bnb_layers()
    with dequantized_bnb_layers(pack.base, torch.float32):  # the CPU trial's compute dtype
        assert bnb_layers() == 0
        plain = pack._answers(jobs)
    assert plain == quantized and bnb_layers() == before > 0
    for t in ids:
        pack.trials[t].until = 6
    assert pack.step()  # trains on the quantized base again

    need = dequantized_bytes(pack.base, torch.bfloat16)
    pack.device = torch.device("cuda")  # only the choice of context: nothing below runs on a GPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need - 1, 10 * need))
    assert type(pack._decoding_weights()).__name__ == "nullcontext"  # too little free memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need, 10 * need))
    assert type(pack._decoding_weights()).__name__ == "_GeneratorContextManager"


@pytest.mark.parametrize("method", ["qlora", "galore"])
def test_packed_trials_cross_epochs_as_the_hf_trainer_does(method, tmp_path, tiny_gemma_dir, unified_data):
    """16 train rows in batches of 5: each epoch's last batch holds 1 row, and the next epoch reshuffles.
    A packed trial (QLoRA on one base, GaLore on stacked weights) beside another takes the same
    batches, so its per-step losses and trained tokens are those of `duetto train` of it alone."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import train_packed
    from duetto.trainers.trial import run_trial

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", f"method={method}",
              "max_seq_len=64", "batch_size=5", "data.limit_train=16", "epochs=2", "logging_steps=1",
              "report_every_steps=0", "interim_eval_examples=0", "eval.num_examples=2", "eval.max_new_tokens=4",
              "eval.loss_examples=8", "scaling.num_workers=0", "qlora.dropout=0.0", "learning_rate=3e-3",
              "gradient_checkpointing=false", "galore.rank=8"]  # fmt: skip
    cfgs = lambda tag: [load_config(TrialConfig, None, common + [f"seed={s}", f"output_dir={tmp_path / tag / str(s)}"])
                        for s in (1, 2)]  # fmt: skip
    solo = run_trial(cfgs("alone")[0])
    packed = train_packed(cfgs("packed"), torch.device("cpu"))[0]
    assert solo["step"] == packed["step"] == 8  # 4 batches an epoch, the 4th of 1 row
    assert packed["trained_tokens"] == solo["trained_tokens"]
    want = [loss for _, loss in solo["train_loss_curve"]]
    assert [loss for _, loss in packed["train_loss_curve"]] == pytest.approx(want, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_steps_stacked_adapters_as_foreach_does_on_cuda(tiny_gemma_dir):
    """On a GPU a pack's trials step with torch's fused AdamW (as a trial alone on the fast path): over
    adapter weights that are views into the stacked tensors (B a transposed slice) it computes what
    the multi-tensor AdamW computes."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32).cuda()
    specs = [LoraSpec(r=4, alpha=8), LoraSpec(r=8, alpha=16)]
    states = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        layers = pack_lora(model, TARGETS, specs)
        trials = PackedTrials(layers, [TrialOptim(learning_rate=3e-3, weight_decay=0.1, total_steps=4, fused=fused)
                                       for _ in specs])  # fmt: skip
        assert trials.optimizers[0].defaults["fused"] is (True if fused else None)
        model.train()
        for i in range(4):
            trials.step(model, {t: {k: v.cuda() for k, v in _batches(20 + t, 4, base.config.vocab_size)[i].items()}
                                for t in range(len(specs))})  # fmt: skip
        states.append([peft_adapter_state(layers, t) for t in range(len(specs))])
    for got, want in zip(*states):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_block_without_labels_has_a_nan_loss_and_no_nan_gradient(tiny_gemma_dir):
    """As HF's loss of a batch without label tokens is NaN, so is such a block's; the backward of the
    pack's summed loss still gives every other block's adapter its gradient, and this one zero."""
    from transformers import AutoModelForCausalLM

    from duetto.trainers.packed_lora import hand_out_grads, set_slices, stack_adapters, stacked_tensors

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    layers = pack_lora(model, TARGETS, [LoraSpec(r=2, alpha=4), LoraSpec(r=4, alpha=4)])
    stack_adapters(layers, [0, 1])
    batch = _batches(1, 1, model.config.vocab_size)[0]
    joined = {k: torch.cat([v, v]) for k, v in batch.items()}
    joined["labels"][2:] = -100  # trial 1's block: no label
    set_slices(layers, [(0, 0, 2), (1, 2, 4)])
    losses = PackedTrials.losses(model, joined, 2)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1])
    losses.sum().backward()  # as a pack's step takes the gradient of its summed losses
    assert all(torch.isfinite(p.grad).all() for p in stacked_tensors(layers))
    hand_out_grads(layers, [0, 1])
    layer = next(iter(layers.values()))
    assert float(layer.lora_A[1].weight.grad.abs().max()) == 0.0


def test_optimizer_state_loads_laid_out_as_its_stacked_parameter(tiny_gemma_dir):
    """A saved AdamW state whose tensors are contiguous (an adapter trained unstacked) loads laid out as
    the trial's B weight, a transposed view into the stack, with the same values."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    layers = pack_lora(model, TARGETS, [LoraSpec(r=4, alpha=8)])
    trials = PackedTrials(layers, [TrialOptim(learning_rate=1e-3)])
    trials.step(model, {0: _batches(2, 1, model.config.vocab_size)[0]})
    saved = trials.optimizers[0].state_dict()
    for st in saved["state"].values():
        for k, v in list(st.items()):
            if v.dim() == 2:
                st[k] = v.contiguous()  # as an unstacked adapter's state is laid out
    b = next(iter(layers.values())).lora_B[0].weight
    assert not b.is_contiguous()
    trials.load_optimizer_state(0, saved)
    state = trials.optimizers[0].state[b]
    assert state["exp_avg"].stride() == b.stride()
    torch.testing.assert_close(state["exp_avg"], saved["state"][1]["exp_avg"])


@pytest.mark.parametrize("precision, autocast", [("bf16-mixed", True), ("fp32", False)])
def test_a_pack_trains_and_evaluates_under_the_autocast_of_its_trials_alone(tmp_path, tiny_gemma_dir, unified_data,
                                                                           precision, autocast):  # fmt: skip
    """A trial alone trains and evaluates under the HF Trainer's bf16 autocast when its precision asks for
    it (bf16-mixed; bf16 on a GPU by default): its pack's steps and eval losses run under the same, and
    its answers decode without it, as a trial alone's do."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import Pack

    train, test = unified_data
    common = [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=2", "max_steps=2", "report_every_steps=0", "interim_eval_examples=2", "eval.max_new_tokens=2",
              "eval.loss_examples=4", "scaling.num_workers=0", f"precision={precision}"]  # fmt: skip
    cfgs = [load_config(TrialConfig, None, common + [f"seed={i}", f"qlora.r={4 * (i + 1)}", f"output_dir={tmp_path / str(i)}"])
            for i in range(2)]  # fmt: skip
    pack = Pack(torch.device("cpu"))
    ids = [pack.join(c) for c in cfgs]
    seen: list[tuple[bool, bool]] = []  # (grad enabled: a training step, autocast on) of each forward
    pack.base.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    pack.step()
    assert seen and all(on == autocast for _, on in seen)
    seen.clear()
    pack.eval_loss(ids[0])
    pack.eval_losses(ids)
    assert seen and all(on == autocast for _, on in seen)
    seen.clear()
    pack._answers([(t, pack.trials[t].rows.generation(pack.trials[t].cfg)[:2]) for t in ids])
    assert seen and not any(on for _, on in seen)


def test_a_packs_base_runs_without_activation_checkpointing(tmp_path, tiny_gemma_dir, unified_data):
    """Trials asking for gradient checkpointing (the study's setting) pack onto a base that does not
    recompute activations in backward; packed-vs-alone tests above check the losses are unchanged."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import Pack

    train, test = unified_data
    cfg = load_config(TrialConfig, None, [f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}",
                                          "method=qlora", "max_seq_len=64", "max_steps=2", "gradient_checkpointing=true",
                                          "scaling.num_workers=0", f"output_dir={tmp_path}"])  # fmt: skip
    pack = Pack(torch.device("cpu"))
    pack.join(cfg)
    layers = [m for m in pack.base.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and not any(m.gradient_checkpointing for m in layers)
    pack.step()
