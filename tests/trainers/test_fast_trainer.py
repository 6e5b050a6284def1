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


def test_fast_trainer_step_bookkeeping_matches_the_trainer(tiny_smollm_dir, tmp_path):
    """The fast path's cached FLOP count, gradient clipping and zero_grad give the Trainer's results."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from duetto.trainers.fast_trainer import fast_trainer_cls

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_smollm_dir, dtype=torch.float32)
    model.lm_head.weight.requires_grad_(False)  # a frozen weight: neither clipped nor zeroed
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_grad_norm=0.5)
    fast = fast_trainer_cls()(model=model, args=args)
    plain = Trainer(model=copy.deepcopy(model), args=args)
    x = torch.randint(3, model.config.vocab_size, (2, 16))
    inputs = {"input_ids": x, "labels": x}
    assert fast.floating_point_ops(inputs) == plain.floating_point_ops(inputs) > 0
    for m in (fast.model, plain.model):
        m(**inputs).loss.backward()
    norm_fast, norm_plain = fast._clip_grad_norm(fast.model), plain._clip_grad_norm(plain.model)
    torch.testing.assert_close(norm_fast, norm_plain)
    for a, b in zip(fast.model.parameters(), plain.model.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
    fast.model.zero_grad()
    assert all(p.grad is None for p in fast.model.parameters())


def test_first_fast_step_puts_every_module_in_training_mode(tiny_smollm_dir, tmp_path):
    """PEFT sets only its wrapper's flag on a base that from_pretrained left in eval mode; the fast
    step must still train every layer (LLM.int8 layers take their capturable matmul only in training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from duetto.trainers.fast_trainer import fast_trainer_cls

    base = AutoModelForCausalLM.from_pretrained(tiny_smollm_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.train()
    base.model.layers[0].self_attn.q_proj.base_layer.eval()  # a layer the root's flag does not show
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = fast_trainer_cls()(model=model, args=args)
    seen = []
    trainer.graphed = lambda inputs: seen.append(all(m.training for m in model.modules())) or torch.zeros(())
    x = torch.randint(3, base.config.vocab_size, (1, 8))
    trainer.training_step(model, {"input_ids": x, "labels": x})
    assert seen == [True]


@pytest.mark.parametrize("skip", [True, False])
def test_a_local_trial_writes_no_checkpoint_of_its_last_step(tiny_smollm_dir, tmp_path, skip):
    """The last step's checkpoint is skipped (the trial saves its model next and deletes the folder);
    the earlier ones are written, and on_save still fires at the last step for its interim report."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    from duetto.trainers.fast_trainer import fast_trainer_cls

    saves = []

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saves.append(state.global_step)

    model = AutoModelForCausalLM.from_pretrained(tiny_smollm_dir, dtype=torch.float32)
    x = torch.randint(3, model.config.vocab_size, (8, 16))
    rows = [{"input_ids": r, "labels": r} for r in x]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=4,
                             save_strategy="steps", save_steps=2, per_device_train_batch_size=2)  # fmt: skip
    trainer = fast_trainer_cls()(model=model, args=args, train_dataset=rows, callbacks=[Saves()])
    trainer.graphed = None  # CUDA graphs need a GPU: the Trainer's own step, the fast trainer's saving
    trainer.skip_final_checkpoint = skip
    trainer.train()
    written = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert written == (["checkpoint-2"] if skip else ["checkpoint-2", "checkpoint-4"])
    assert saves == [2, 4]
