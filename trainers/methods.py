"""The two fine-tuning methods as small strategy objects.

A method decides only how the model is built and which optimizer the HF Trainer uses; the training
loop, evaluation, checkpointing and saving are shared (trainers/trial.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from duetto.trainers.compat import disable_nf4_avx512bf16_repack, guard_galore_cuda_synchronize
from duetto.trainers.config import TrialConfig


@dataclass
class Built:
    model: torch.nn.Module
    trainer_args: dict[str, Any]
    """Extra `TrainingArguments` fields this method needs (optimizer name and options)."""
    trainable_params: int
    total_params: int


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT: counts 4-bit packed weights correctly
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


class GaloreMethod:
    """Full-parameter fine-tuning; GaLore projects the gradients of the attention/MLP weights."""

    name = "galore"

    def build(self, cfg: TrialConfig, model_path: str, dtype: torch.dtype, device: torch.device) -> Built:
        from transformers import AutoModelForCausalLM

        guard_galore_cuda_synchronize()
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        return Built(model, self.trainer_args(cfg), *param_counts(model))

    @staticmethod
    def trainer_args(cfg: TrialConfig) -> dict[str, Any]:
        """The `TrainingArguments` fields that select GaLore and its settings."""
        g = cfg.galore
        return {
            "optim": "galore_adamw_8bit_layerwise" if g.layerwise else "galore_adamw_8bit",
            "optim_target_modules": list(g.target_modules),
            "optim_args": f"rank={g.rank}, update_proj_gap={g.update_proj_gap}, scale={g.scale}, proj_type={g.proj_type}",
        }


class _OnceFilter:
    """Lets the first record through and drops the rest (see quiet_int8_cast_warning)."""

    def __init__(self, needle: str):
        self.needle, self.seen = needle, False

    def filter(self, record) -> bool:
        if self.needle not in str(record.msg):
            return True
        first, self.seen = not self.seen, True
        return first


def quiet_int8_cast_warning() -> None:
    """LLM.int8 logs "MatMul8bitLt: inputs will be cast ... to float16" (logger.warning, not warnings)
    on every matmul call: a line per layer per forward and backward, megabytes per trial, and under
    Ray every line crosses the log monitor. Measured on the H200: the study's int8 QLoRA ran at about
    1 step/s on SmolLM2-135M with it. Once is enough to know it happens."""
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


class QloraMethod:
    """LoRA adapters on a frozen base quantised by bitsandbytes (LLM.int8 or NF4 + double quant)."""

    name = "qlora"

    def build(self, cfg: TrialConfig, model_path: str, dtype: torch.dtype, device: torch.device) -> Built:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = cfg.qlora
        quiet_int8_cast_warning()
        if q.bits == 8:
            bnb = BitsAndBytesConfig(load_in_8bit=True)
        else:
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=dtype)
        # Each DDP worker holds a whole copy of the base on its own device.
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb, dtype=dtype,
                                                     device_map={"": device})
        if q.upcast_fp32:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        else:  # the same preparation without its fp32 copy of every unquantized weight
            for p in model.parameters():
                p.requires_grad_(False)
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable_nf4_avx512bf16_repack(model)
        targets = "all-linear" if list(q.target_modules) == ["all-linear"] else q.target_modules
        lora = LoraConfig(r=q.r, lora_alpha=q.alpha, lora_dropout=q.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        return Built(model, {"optim": "adamw_torch"}, *param_counts(model))


class BaselineMethod:
    """The base model as it is: the study's Baseline row, evaluated through the same trial path."""

    name = "baseline"

    def build(self, cfg: TrialConfig, model_path: str, dtype: torch.dtype, device: torch.device) -> Built:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        return Built(model, {}, 0, param_counts(model)[1])


METHODS = {"galore": GaloreMethod, "qlora": QloraMethod, "baseline": BaselineMethod}


def get_method(name: str):
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"method: unknown {name!r} (choose from {', '.join(METHODS)})") from None
