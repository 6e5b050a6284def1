"""Library work-arounds of trainers/compat.py, each checked against a reference."""

from __future__ import annotations

import pytest
import torch


def test_galore_8bit_steps_on_cpu_after_guard():
    from galore_torch import GaLoreAdamW8bit

    from duetto.trainers.compat import guard_galore_cuda_synchronize

    if torch.cuda.is_available():
        pytest.skip("the guard is a no-op with CUDA")
    assert guard_galore_cuda_synchronize() is True
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = GaLoreAdamW8bit([{"params": [w], "rank": 8, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}], lr=1e-2)
    before = w.detach().clone()
    for _ in range(3):
        (w**2).sum().backward()
        opt.step()  # raised "Torch not compiled with CUDA enabled" before the guard
        opt.zero_grad()
    assert not torch.equal(before, w.detach())
    assert (w.detach() ** 2).sum() < (before**2).sum()  # it descends
    # torch itself is untouched: only galore's module sees the no-op synchronize
    assert torch.cuda.synchronize.__module__ == "torch.cuda"


def test_nf4_lora_gradients_match_fp32_reference_after_eval_forward(tiny_gemma_dir):
    """After an eval (no-grad) forward, LoRA gradients through NF4 layers equal those of an fp32 model
    holding the same dequantised weights and the same adapters."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from duetto.trainers.compat import disable_nf4_avx512bf16_repack

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    qmodel = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, quantization_config=nf4, dtype=torch.float32,
                                                  device_map={"": "cpu"})
    disable_nf4_avx512bf16_repack(qmodel)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in qmodel.modules())
    ref = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    ref_modules = dict(ref.named_modules())
    n4 = 0
    for name, module in qmodel.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ref_modules[name].weight.data = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            n4 += 1
    assert n4 > 0

    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                init_lora_weights=False)  # random B too, so every LoRA gradient is non-zero
    torch.manual_seed(0)
    qpeft = get_peft_model(qmodel, LoraConfig(**lora))
    rpeft = get_peft_model(ref, LoraConfig(**lora))
    rpeft.load_state_dict({k: v for k, v in qpeft.state_dict().items() if "lora_" in k}, strict=False)

    ids = torch.randint(5, 200, (2, 16))
    qpeft.eval()
    with torch.no_grad():
        qpeft(input_ids=ids)  # the forward that repacks weights on AVX512-BF16 CPUs without the fix
    qpeft.train()
    for model in (qpeft, rpeft):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    qgrads = {n: p.grad for n, p in qpeft.named_parameters() if "lora_" in n}
    rgrads = {n: p.grad for n, p in rpeft.named_parameters() if "lora_" in n}
    assert qgrads and qgrads.keys() == rgrads.keys()
    for n in qgrads:
        assert qgrads[n] is not None and qgrads[n].abs().sum() > 0, n
        torch.testing.assert_close(qgrads[n], rgrads[n], rtol=2e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("upcast", [True, False])
def test_qlora_upcast_switch_keeps_unquantized_weights_in_compute_dtype(tiny_gemma_dir, unified_data, upcast):
    """qlora.upcast_fp32=false skips PEFT's fp32 copy of the embeddings and norms; LoRA still learns."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.methods import QloraMethod

    cfg = load_config(TrialConfig, None, [
        "method=qlora", f"model={tiny_gemma_dir}", f"data.train={unified_data[0]}", f"data.test={unified_data[1]}",
        "qlora.bits=8", f"qlora.upcast_fp32={str(upcast).lower()}",
    ])  # fmt: skip
    model = QloraMethod().build(cfg, str(tiny_gemma_dir), torch.bfloat16, torch.device("cpu")).model
    emb = model.get_input_embeddings().weight
    assert emb.dtype == (torch.float32 if upcast else torch.bfloat16) and not emb.requires_grad
    norms = {p.dtype for n, p in model.named_parameters() if "norm" in n}
    assert norms == {torch.float32 if upcast else torch.bfloat16}
    model.train()
    ids = torch.randint(0, 100, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_checkpointing_args_are_keywords_this_transformers_accepts(monkeypatch):
    """The GPU image's transformers 5.17 has only gradient_checkpointing*; newer 5.x renames them."""
    import dataclasses

    from transformers import TrainingArguments

    from duetto.trainers.compat import checkpointing_args

    args = checkpointing_args(True)
    assert set(args) <= {f.name for f in dataclasses.fields(TrainingArguments)}
    assert TrainingArguments(output_dir="/tmp/duetto-ckpt-args", report_to=[], **args)
    # an older transformers without the new names gets the old ones
    fields = [f for f in dataclasses.fields(TrainingArguments) if not f.name.startswith("activation_checkpointing")]
    monkeypatch.setattr(dataclasses, "fields", lambda cls: fields if cls is TrainingArguments else ())
    assert set(checkpointing_args(False)) == {"gradient_checkpointing", "gradient_checkpointing_kwargs"}


@pytest.mark.parametrize("with_callback", [True, False])
def test_layerwise_galore_follows_the_schedule_with_the_callback(tiny_smollm_dir, tmp_path, with_callback):
    """The HF Trainer's layer-wise GaLore: its per-weight optimizers step at the scheduler's rate of each
    step (warm-up, then linear decay) with layerwise_schedule_callback; without it they stay at the
    initial rate, which is the library behaviour the callback exists for."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from duetto.trainers.compat import guard_galore_cuda_synchronize, layerwise_schedule_callback

    guard_galore_cuda_synchronize()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_smollm_dir, dtype=torch.float32)
    rows = [{"input_ids": torch.randint(3, 100, (16,)), "labels": torch.randint(3, 100, (16,))} for _ in range(12)]
    args = TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw_8bit_layerwise", use_cpu=True,
                             optim_target_modules=["self_attn", "mlp"], learning_rate=1e-2, lr_scheduler_type="linear",
                             warmup_steps=2, max_steps=6, per_device_train_batch_size=2, report_to="none",
                             max_grad_norm=0.0, optim_args="rank=8, update_proj_gap=3, scale=0.25, proj_type=std")  # fmt: skip
    seen: list[float] = []

    class Watch(TrainerCallback):  # after the schedule callback: the rate the step's backward steps with
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            per_weight = optimizer.optimizer.optimizer_dict
            rates = {g["lr"] for opt in per_weight.values() for g in opt.param_groups}
            assert len(rates) == 1
            seen.append(rates.pop())

    callbacks = [layerwise_schedule_callback(), Watch()] if with_callback else [Watch()]
    Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
    if with_callback:
        assert seen == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    else:
        assert seen == pytest.approx([1e-2] * 6)


def _fresh_python(code: str, **env: str) -> str:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_bitsandbytes_imports_without_building_a_compiler_and_its_functions_still_run():
    """import_bitsandbytes: a trial's imports (transformers' Trainer, PEFT) then never set up
    TorchInductor for bitsandbytes' compiled fallback kernels; torch.compile is the real one again."""
    out = _fresh_python(
        "import sys, torch; real = torch.compile\n"
        "from duetto.trainers.compat import import_bitsandbytes\n"
        "bnb = import_bitsandbytes()\n"
        "import peft; from transformers import Trainer\n"
        "print(bnb is sys.modules['bitsandbytes'], 'torch._inductor.compile_fx' in sys.modules, torch.compile is real)"
    )  # fmt: skip
    assert out == "True False True"
    # a deferred function compiles at its first call (TorchDynamo off here: the compile is the plain
    # function, so the test needs no C++ compiler) and computes what the function computes
    out = _fresh_python(
        "import torch\n"
        "from duetto.trainers.compat import import_bitsandbytes\n"
        "import_bitsandbytes()\n"
        "from bitsandbytes.backends.default import ops\n"
        "A = torch.randint(0, 256, (64,), dtype=torch.uint8); absmax = torch.rand(1) + 0.5\n"
        "code = torch.linspace(-1, 1, 256)\n"
        "got = ops._dequantize_blockwise_compute(A, absmax, code, 64, torch.float32)\n"
        "want = ops._dequantize_blockwise_compute.__wrapped__(A, absmax, code, 64, torch.float32)\n"
        "print(torch.equal(got, want))",
        TORCHDYNAMO_DISABLE="1",
    )  # fmt: skip
    assert out == "True"


def test_checkpointing_off_turns_a_models_checkpointing_off_by_the_name_this_transformers_has(tiny_gemma_dir):
    import warnings

    from transformers import AutoModelForCausalLM

    from duetto.trainers.compat import checkpointing_off

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated name
        checkpointing_off(model)
    assert not any(m.gradient_checkpointing for m in layers)
