"""Several GaLore trials trained in one step: their weights stacked, one batched forward and backward.

A GaLore trial fine-tunes every weight, so trials share no weights the way QLoRA trials share a
base. At the study's size (batch 2 x 128 on a 135M-1B model) a step is bound by launching kernels,
not by arithmetic; stacking N trials' weights (``torch.func.stack_module_state``'s layout: one
tensor [N, ...] per weight) and running ``vmap`` of ``functional_call`` over them turns each matmul
of the N models into one batched matmul, so N trials cost about what one costs. Measured with
``benchmarks/galore_stack.py`` on an H100 (SmolLM2-135M, both arms replayed as CUDA graphs): 8
trials stacked trained 2.29x the tokens/s of the same 8 trials one after another.

Each trial keeps what makes it itself: its own model object (its weights are views into the stacked
tensors, so evaluation, generation and saving use it as `duetto train` would), its data order, its
fused GaLore 8-bit optimizer (trainers/galore_fused.py, built from the HF ``galore_adamw_8bit``
param groups of its own rank, update_proj_gap, scale, proj_type, lr and weight decay), its
learning-rate schedule and its gradient clip (none when layer-wise, as the HF Trainer does). Its
loss is the mean cross-entropy over its own label tokens, as HF computes it.

What differs from a trial alone: the projection runs after backward for every trial (layer-wise
GaLore projects inside backward to free each full gradient early; the update is the same),
gradient checkpointing is off (it saves memory, it does not change the math), and a stack of bf16
weights steps without bf16 autocast (_step_autocast). The forward runs
without an attention mask: batches are right-padded, so under the causal mask no real token ever
attends to padding, and padding carries no label.

The stack is rebuilt when a trial joins or leaves (a copy of the attached trials' weights); trials
attached but waiting (a Tune client between reports) run on padding rows with no labels, which
gives them a zero loss and zero gradients, so one CUDA graph serves every step of a membership.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from duetto.trainers.config import TrialConfig
from duetto.trainers.packed_run import Pack, PackedTrial, evaluate_loss, free_gpu_bytes, total_steps, warmup_steps
from duetto.trainers.refresh_pool import WORKERS, RefreshPool

#: threads running a stack's SVD refreshes: the trials' refreshes at one step run side by side
STACK_REFRESH_WORKERS = 2 * WORKERS


class StackedWeights:
    """The trainable weights of several same-architecture models as one tensor [slots, ...] per weight,
    each model's parameters re-pointed to its slot's views."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        self.names = [n for n, p in models[0].named_parameters() if p.requires_grad]
        by_name = [dict(m.named_parameters()) for m in models]
        self.params = [[named[n] for n in self.names] for named in by_name]
        """Each slot's trainable parameters, in ``names`` order."""
        self.tensors: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            stacked = torch.stack([params[i].detach() for params in self.params]).requires_grad_(True)
            for slot, params in enumerate(self.params):
                params[i].data = stacked[slot]  # the model now reads and the optimizer updates the slot in place
            self.tensors[name] = stacked

    def hand_out_grads(self, slots: Sequence[int]) -> None:
        """The parameters of each of these slots get their slot of the stacked gradients (views, no copy)."""
        grads = [None if t.grad is None else t.grad.unbind(0) for t in self.tensors.values()]
        for slot in slots:
            for p, g in zip(self.params[slot], grads):
                p.grad = None if g is None else g[slot]

    def clear_grads(self) -> None:
        for t in self.tensors.values():
            t.grad = None


def stacked_losses(skeleton: torch.nn.Module, weights: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Each slot's mean cross-entropy over its label tokens ([slots]), from ``input_ids`` and ``labels``
    [slots, rows, length] through ``skeleton``'s forward with that slot's weights. A slot with no
    label token has loss 0 (and zero gradients)."""
    sums, counts = stacked_token_losses(skeleton, weights, buffers, input_ids, labels)
    return sums / counts.clamp(min=1)


def stacked_token_losses(skeleton: torch.nn.Module, weights: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                         input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``stacked_losses`` as each slot's summed cross-entropy over its label tokens and their count
    ([slots] each), so that rows passed in parts add up to the loss of all of them."""
    from torch.func import functional_call, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def logits_of(w, x):
        return functional_call(skeleton, ({**w, **buffers},), (), {"input_ids": x, "use_cache": False}).logits

    # the fused SDPA kernels reject vmap's batched strides; the math kernel is plain batched matmuls
    with sdpa_kernel([SDPBackend.MATH]):
        logits = vmap(logits_of, in_dims=(0, 0), randomness="different")(weights, input_ids)
    shift_logits = logits[:, :, :-1].float()
    shift_labels = labels[:, :, 1:]
    per_token = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                  shift_labels.reshape(-1), ignore_index=-100, reduction="none")  # fmt: skip
    slots = labels.shape[0]
    counts = (shift_labels != -100).reshape(slots, -1).sum(1)
    return per_token.reshape(slots, -1).sum(1), counts


class GaloreStack(Pack):
    """GaLore trials trained together on stacked weights, with the ``Pack`` interface (join, step,
    interim_reports, finish, state, leave, has_room) that the packing actor drives. Memory sizing is
    the pack's: a trial's measured share of a step's peak (its weights, gradients, optimizer states
    and activations, plus the copy a re-stack makes) within ``memory_fraction`` of the GPU."""

    graphs_kept = 1  # one graph: the whole stack's forward and backward

    def __init__(self, device: torch.device, max_trials: int = 0, memory_fraction: float = 0.9, memory=None):
        super().__init__(device, max_trials=max_trials, memory_fraction=memory_fraction, memory=memory)
        self.models: dict[int, torch.nn.Module] = {}
        self.optimizers: dict[int, Any] = {}
        self.schedulers: dict[int, Any] = {}
        self.clips: dict[int, float] = {}
        self.stack: StackedWeights | None = None
        self.slots: list[int] = []
        """Trial ids in stack order (the stack is stale when it differs from the attached trials)."""
        self.skeleton: torch.nn.Module | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.graphed: Any = None
        self.refresher: RefreshPool | None = None
        """The pool every trial's projection refreshes run in, side by side (their gradients stay in
        the stack, so all of them may wait)."""
        self._next_id = 0

    # --- trials in and out ---

    def join(self, cfg: TrialConfig, until: int | None = None, state: bytes | None = None) -> int:
        rows, dataset, dtype = self._prepare(cfg)  # the join's set-up starts there
        import copy

        from transformers import get_scheduler

        from duetto.trainers.methods import get_method

        # the build loads on the CPU (the HF Trainer moves a trial's model to its device)
        model = get_method("galore").build(cfg, self.model_path, dtype, self.device).model.to(self.device)
        model.config.use_cache = False
        model.train()
        if self.skeleton is None:  # the forward the stacked weights run through; its own weights are never read
            self.skeleton = copy.deepcopy(model)
            for p in self.skeleton.parameters():  # so they hold no memory (tied weights stay one parameter)
                p.requires_grad_(False)
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self.buffers = dict(self.skeleton.named_buffers())
        t = self._next_id
        self._next_id += 1
        total = total_steps(cfg, len(dataset))
        self.models[t] = model
        if self.refresher is None:
            self.refresher = RefreshPool(self.device, workers=STACK_REFRESH_WORKERS, waiting=1 << 30)
        self.optimizers[t], self.clips[t] = galore_optimizer(cfg, model, self.device, self.refresher)
        self.schedulers[t] = get_scheduler(cfg.lr_scheduler, self.optimizers[t],
                                           num_warmup_steps=warmup_steps(cfg, total), num_training_steps=total)  # fmt: skip
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return self._admit(t, cfg, rows, dataset, total, trainable, until, state)

    def leave(self, t: int) -> None:
        if self.trials.pop(t, None) is None:
            return
        for d in (self.models, self.optimizers, self.schedulers, self.clips):
            d.pop(t, None)
        self.graphed = None  # its weights leave the stack: the next step re-stacks and captures again
        if not self.trials:  # nothing left to stack: give the stacked weights and gradients back
            self.stack, self.slots = None, []

    def _trial_state(self, t: int) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu().clone() for k, v in self.models[t].state_dict().items()},
                "optimizer": self.optimizers[t].state_dict(), "scheduler": self.schedulers[t].state_dict()}  # fmt: skip

    def _load_trial_state(self, t: int, saved: dict[str, Any]) -> None:
        self.models[t].load_state_dict(saved["model"])
        self.optimizers[t].load_state_dict(saved["optimizer"])
        self.schedulers[t].load_state_dict(saved["scheduler"])

    # --- the step ---

    def _restack(self) -> None:
        """Stack the attached trials' weights (their current values) into fresh tensors."""
        self.graphed = None
        if self.stack is not None:
            self.stack.clear_grads()
        self.slots = sorted(self.trials)
        self.stack = StackedWeights([self.models[t] for t in self.slots])

    def _train(self, batches: dict[int, dict[str, torch.Tensor]]) -> dict[int, float]:
        if self.slots != sorted(self.trials) or self.stack is None:
            self._restack()
        stack = self.stack
        first = next(iter(batches.values()))
        ids = torch.full((len(self.slots), *first["input_ids"].shape), self.tokenizer.pad_token_id,
                         dtype=first["input_ids"].dtype, device=self.device)  # fmt: skip
        labels = torch.full_like(ids, -100)  # a waiting trial's slot: no label, no gradient
        for slot, t in enumerate(self.slots):
            if t in batches:
                ids[slot], labels[slot] = batches[t]["input_ids"], batches[t]["labels"]
        inputs = {"input_ids": ids, "labels": labels}
        autocast = self._step_autocast()

        def loss_fn(batch):
            return stacked_losses(self.skeleton, stack.tensors, self.buffers, batch["input_ids"], batch["labels"])

        if self.uses_graphs():
            if self.graphed is None:
                from duetto.trainers.graph_step import GraphedStep

                if self._side is None:
                    self._side = torch.cuda.Stream(device=self.device)
                self.graphed = GraphedStep(self.skeleton, autocast_bf16=autocast, loss_fn=loss_fn,
                                           side_stream=self._side, params=list(stack.tensors.values()))  # fmt: skip
            replays = self.graphed.replays
            losses = self.graphed(inputs)
            self._replayed = self.graphed.replays > replays
        else:
            stack.clear_grads()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = loss_fn(inputs)
            losses.sum().backward()
        live = [(slot, t) for slot, t in enumerate(self.slots) if t in batches]
        stack.hand_out_grads([slot for slot, _ in live])
        for slot, t in live:
            if self.clips[t] > 0:
                torch.nn.utils.clip_grad_norm_(stack.params[slot], self.clips[t], foreach=True)
            # every trial's refreshes go to the shared pool before any step waits for them
            self.optimizers[t].project_gradients()
        for slot, t in live:
            params = stack.params[slot]
            self.optimizers[t].step()
            self.schedulers[t].step()
            for p in params:
                p.grad = None
        values = losses.detach().tolist()  # one wait for the GPU, not one a trial
        return {t: values[slot] for slot, t in live}

    def _refreshing(self, live: Sequence[int]) -> bool:
        return any(self.optimizers[t].refresh_due for t in live)

    def _autocast_bf16(self) -> bool:
        """The trials' autocast (Pack._autocast_bf16) on a GPU only: on a CPU the stacked forward under
        ``vmap`` fails under CPU autocast (Gemma 3's attention gets float32 queries and keys and bf16
        values), so a CPU stack with ``bf16-mixed`` steps and evaluates in float32."""
        return self.device.type == "cuda" and super()._autocast_bf16()

    def _step_autocast(self) -> bool:
        """Whether the stacked step runs under bf16 autocast: only over fp32 weights (``bf16-mixed``). Over
        bf16 weights autocast changes no matmul, and the model's float32 parts (RMSNorm, rotary
        embeddings, the loss) upcast themselves; under ``vmap`` it also breaks CUDA graph capture
        (the math attention kernel's safe-softmax backward gets a gradient of another dtype than its
        input), so a bf16 stack steps without it."""
        if not self._autocast_bf16():
            return False
        return next(iter(self.models.values())).get_input_embeddings().weight.dtype == torch.float32

    # --- evaluation and output ---

    @contextmanager
    def _evaluating(self, t: int):
        """Trial t's model in eval mode, back in training mode after."""
        model = self.models[t]
        model.eval()
        try:
            yield model
        finally:
            model.train()

    def eval_losses(self, ts: Sequence[int]) -> dict[int, float]:
        """``eval_loss`` of each trial of ``ts``. Trials that evaluate on the same rows at the same batch
        size share each evaluation batch: one stacked forward without gradients (a step's, over the stack's
        slots from the first of those trials' to the last) runs its rows for all of them, and each slot's
        mean token loss over the batch is that trial's loss of the batch, as its own forward computes it."""
        out: dict[int, float] = {}
        for _, trials in self._eval_groups(ts):
            if len(trials) == 1:
                out[trials[0]] = self.eval_loss(trials[0])
                continue
            if self.slots != sorted(self.trials) or self.stack is None:
                self._restack()
            # views of the stack, no copy: slots outside the span cost nothing
            where = [self.slots.index(t) for t in trials]
            first, k = min(where), max(where) - min(where) + 1
            slots = [w - first for w in where]
            weights = {name: w[first : first + k] for name, w in self.stack.tensors.items()}
            totals, rows = torch.zeros(len(trials), dtype=torch.float64), 0
            with torch.no_grad(), self._autocast(), self._skeleton_evaluating():
                for batch in self._eval_batches(trials[0]):  # the group's rows and batch size
                    n, length = batch["input_ids"].shape
                    sums = torch.zeros(k, dtype=torch.float64, device=self.device)
                    counts = torch.zeros(k, dtype=torch.long, device=self.device)
                    per_pass = self._rows_per_eval_pass(k, n, length)
                    for r in range(0, n, per_pass):
                        ids, labels = (batch[key][r : r + per_pass].to(self.device) for key in ("input_ids", "labels"))
                        part_sums, part_counts = stacked_token_losses(self.skeleton, weights, self.buffers,
                                                                      ids.expand(k, *ids.shape), labels.expand(k, *labels.shape))  # fmt: skip
                        sums += part_sums.double()
                        counts += part_counts
                    losses = (sums / counts.clamp(min=1)).cpu()  # one wait for the GPU per batch, not one a trial
                    totals += losses[slots] * n
                    rows += n
            out.update({t: float(totals[i]) / max(rows, 1) for i, t in enumerate(trials)})
        return out

    def _rows_per_eval_pass(self, slots: int, rows: int, length: int) -> int:
        """How many of a batch's rows one stacked evaluation forward takes: on a GPU, while every slot's
        logits (bf16, their float copy and its log-softmax) and one layer's attention scores (the math
        kernel's, bf16 and their float softmax) stay within a quarter of the memory free or cached."""
        if self.device.type != "cuda":
            return rows
        config = self.skeleton.config  # the skeleton's own weights hold no memory
        heads = getattr(config, "num_attention_heads", 1)
        per_row = slots * length * (config.vocab_size * (2 + 4 + 4) + heads * length * (2 + 4))
        return max(1, min(rows, int(free_gpu_bytes(self.device) // 4 // per_row)))

    @contextmanager
    def _skeleton_evaluating(self):
        """The stacked forward in eval mode (no dropout), back in training mode after."""
        self.skeleton.eval()
        try:
            yield
        finally:
            self.skeleton.train()

    def eval_loss(self, t: int) -> float:
        """Trial t's eval_loss now, as the HF Trainer's evaluate computes it."""
        # under the trials' autocast, as the HF Trainer's evaluation runs
        with self._evaluating(t) as model, self._autocast():
            return evaluate_loss(model, self._eval_batches(t), self.device)

    def _answers(self, jobs: Sequence[tuple[int, list[dict]]]) -> dict[int, list[str]]:
        """Greedy answers of each (trial, rows) from the trial's own model, as trial evaluation decodes them."""
        from duetto.trainers.trial_reports import generation_metrics

        out: dict[int, list[str]] = {}
        for t, rows in jobs:
            with self._evaluating(t) as model:
                out[t] = generation_metrics(model, self.tokenizer, rows, self.trials[t].cfg)[1]
        return out

    def _total_params(self, t: int) -> int:
        return sum(p.numel() for p in self.models[t].parameters())

    def _save(self, t: int) -> Any:
        """Trial t's output_dir/model: the full model and tokenizer, as `duetto train` saves a GaLore trial."""
        import shutil
        from pathlib import Path

        out = Path(self.trials[t].cfg.output_dir) / "model"
        if out.exists():
            shutil.rmtree(out)
        self.models[t].save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        return out

    def _fast_path(self, tr: PackedTrial) -> str:
        stacked = f"stacked: {len(self.trials)} trials' weights in one step when it left"
        if not self.uses_graphs():
            return stacked
        return f"{stacked}; {tr.replayed} of {tr.step - tr.resumed_from} steps replayed as a CUDA graph"


def galore_optimizer(cfg: TrialConfig, model: torch.nn.Module, device: torch.device,
                     refresher: RefreshPool | None = None) -> tuple[Any, float]:  # fmt: skip
    """(the trial's fused GaLore 8-bit optimizer, its gradient-clip norm): the param groups, library
    defaults and quirks the HF Trainer's ``galore_adamw_8bit`` set-up gives this config, and the clip
    the trial's TrainingArguments set (none for layer-wise GaLore)."""
    import tempfile

    from transformers import TrainingArguments

    from duetto.trainers.compat import guard_galore_cuda_synchronize
    from duetto.trainers.galore_fused import FusedGaLoreAdamW8bit, hf_galore_param_groups
    from duetto.trainers.methods import get_method

    guard_galore_cuda_synchronize()
    g = cfg.galore
    method_args = get_method("galore").trainer_args(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                 use_cpu=device.type != "cuda", report_to="none", **method_args)  # fmt: skip
        groups, defaults, quirks = hf_galore_param_groups(args, model)
    # the projection runs after backward for every trial of a stack (see the module doc)
    optimizer = FusedGaLoreAdamW8bit(groups, layerwise=False, defaults=defaults, quirks=quirks, refresher=refresher)
    return optimizer, 0.0 if g.layerwise else 1.0
