"""The HF Trainer with the GPU fast path: graphed steps, the fused GaLore optimizer, no per-step sync.

Everything else stays the Trainer's: data order and seeds, the learning-rate schedule, clipping,
logging, evaluation, checkpoints and exact resume, Ray Train's callbacks. What changes on one CUDA
GPU (``cuda_graphs``, on by default there):

- each micro-batch's forward and backward is one CUDA graph replay (trainers/graph_step.py);
- GaLore steps with ``FusedGaLoreAdamW8bit`` (the library's math in a few fused calls, weights
  updated in place), layer-wise or not; QLoRA's LoRA weights with torch's fused AdamW;
- trained tokens are summed on the GPU and read at logs and saves, not with a ``.item()`` a step,
  and the NaN-loss filter (another per-step read) is off, so the host never waits for the GPU
  between steps;
- the Trainer's per-step walks over every module and parameter (``model.train()``, ``zero_grad``,
  gradient clipping, the FLOP count) use lists made once: on a PEFT model over bitsandbytes layers
  they took over half of a replayed step's host time (py-spy, SmolLM2-135M QLoRA on an H100).

Steps that must run Python inside backward run eagerly: GaLore's projection refresh (an SVD per
weight every ``update_proj_gap`` steps) and a batch of another shape.
"""

from __future__ import annotations

from typing import Any

import torch


def fast_path_blocker(cfg, *, on_gpu: bool, world_size: int) -> str | None:
    """Why a trial with these settings takes the plain Trainer step, or None for the fast path."""
    if cfg.cuda_graphs is False:
        return "cuda_graphs=false"
    if not on_gpu:
        return "no CUDA device"
    if world_size > 1:
        return "DDP (several workers)"
    if cfg.gradient_accumulation_steps != 1:
        return "gradient accumulation"
    if cfg.compile:
        return "compile=true"
    from duetto.trainers.galore_fused import FUSED_PROJ_TYPES

    if cfg.method == "galore" and cfg.galore.proj_type not in FUSED_PROJ_TYPES:
        return f"galore.proj_type={cfg.galore.proj_type} has no fused optimizer"
    return None


def _zero_grad_of(params: list[torch.nn.Parameter]):
    def zero_grad(set_to_none: bool = True) -> None:
        for p in params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    return zero_grad


def fast_trainer_cls():
    """Built lazily so importing this module does not import transformers."""
    from transformers import Trainer

    from duetto.trainers.graph_step import GraphedStep, prepare_for_graphs

    class FastTrainer(Trainer):
        def __init__(self, *args, galore_layerwise: bool | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.galore_layerwise = galore_layerwise  # None: not a GaLore trial
            blocker = prepare_for_graphs(self.model)
            self.graph_blocker = blocker
            self.graphed = None if blocker else GraphedStep(self.model, autocast_bf16=self.args.bf16)
            self._pending_tokens: torch.Tensor | None = None
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
            self._flops_per_token: int | None = None
            self._modes_set = False
            # The loop calls model.zero_grad(), a walk over every parameter, after each step; the
            # parameters that can hold a gradient are known.
            self.model.zero_grad = _zero_grad_of(self._trainable)

        #: Set by a trial in Ray Train's local mode, which saves its model right after the last step and
        #: then deletes hf_checkpoints: a checkpoint of that step would be written only to be removed.
        skip_final_checkpoint = False

        def _save_checkpoint(self, model, trial):
            if self.skip_final_checkpoint and self.state.global_step >= self.state.max_steps > 0:
                return  # the Trainer still calls on_save: the step's interim report goes out
            return super()._save_checkpoint(model, trial)

        def floating_point_ops(self, inputs) -> int:
            """The Trainer's count (6 x tokens x non-embedding parameters), the parameters counted once."""
            key = getattr(self.model, "main_input_name", "input_ids")
            if key not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._flops_per_token is None:
                self._flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return inputs[key].numel() * self._flops_per_token

        def _clip_grad_norm(self, model):
            """accelerate's clip (no scaler in bf16) over the trainable parameters; returns the pre-clip norm."""
            return torch.nn.utils.clip_grad_norm_(self._trainable, self.args.max_grad_norm, foreach=True)

        def _get_grad_norm(self, model, grad_norm=None):
            if grad_norm is None:  # max_grad_norm 0 (layer-wise GaLore): the norm of what is left, unclipped
                grads = [p.grad for p in self._trainable if p.grad is not None]
                return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
            return grad_norm

        # --- the optimizer ---

        def create_optimizer(self, model=None):
            if self.galore_layerwise is None or self.optimizer is not None:
                return super().create_optimizer(model)
            from duetto.trainers.galore_fused import FusedGaLoreAdamW8bit, hf_galore_param_groups

            groups, defaults, quirks = hf_galore_param_groups(self.args, model or self.model)
            self.optimizer = FusedGaLoreAdamW8bit(groups, layerwise=self.galore_layerwise, defaults=defaults,
                                                  quirks=quirks)  # fmt: skip
            return self.optimizer

        def _python_in_backward(self) -> bool:
            """A GaLore projection refresh is due: its SVDs run in backward hooks, so the step runs eagerly."""
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
            return bool(getattr(optimizer, "refresh_due", False))

        # --- the step ---

        def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
            if self.graphed is None:
                return super().training_step(model, inputs, num_items_in_batch)
            # model.train() walks every module, so later steps read the root's flag (evaluate() walks
            # them all back to eval); the first step walks: from_pretrained leaves every module in eval
            # mode and PEFT then sets only its wrapper's flag.
            if not model.training or not self._modes_set:
                model.train()
                self._modes_set = True
            inputs = self._prepare_inputs(inputs)
            if self._python_in_backward():
                return self.graphed.eager(inputs)
            return self.graphed(inputs)

        # --- no host sync a step ---

        def _track_num_input_tokens(self, inputs):
            if self.args.include_num_input_tokens_seen != "non_padding" or "attention_mask" not in inputs:
                return super()._track_num_input_tokens(inputs)
            n = inputs["attention_mask"].sum()
            self._pending_tokens = n if self._pending_tokens is None else self._pending_tokens + n

        def flush_token_count(self) -> None:
            if self._pending_tokens is not None:
                self.state.num_input_tokens_seen += int(self._pending_tokens.item())
                self._pending_tokens = None

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            c = self.control
            if c.should_log or c.should_save or c.should_evaluate or c.should_training_stop:
                self.flush_token_count()
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            finally:
                self.flush_token_count()

    return FastTrainer
