"""Several QLoRA trials on one frozen base: each trial's rows pass through the shared base once and
through its own LoRA adapter, in the same forward and backward.

``PackedLoraLinear`` wraps a base linear layer (plain or bitsandbytes 4/8-bit) with one LoRA adapter
per trial (its own rank, alpha and dropout). A packed batch holds the trials' rows one block after
the other; ``set_slices`` tells every packed layer which rows are whose. The base runs once over all
rows; each block then adds its own trial's ``scaling * B(A(dropout(x)))``.

The adapters live stacked (``stack_adapters``): per layer one A tensor [trials, rank, in] and one Bᵀ
tensor [trials, rank, out], each trial's slot zero-padded to the largest rank, and each trial's own
``lora_A`` / ``lora_B`` weights are views into its slot. Equal blocks (every training step, shared
evaluation passes) run through two batched matmuls per layer whatever the trials' ranks, with no
copy of the adapters per step: a step's kernel count does not grow with the number of trials or
ranks. The zero padding adds exact zeros and takes zero gradients, so each trial computes what its
adapter alone computes. Autograd gives the stacked tensors the gradients; ``hand_out_grads`` gives
each trial its slot of them (views, no copy): exactly those of its rows alone. Blocks of any other
shape (decoding) run one trial after another through its own ``lora_A`` / ``lora_B``.

``PackedTrials`` owns one optimizer (AdamW, as the HF Trainer builds it for LoRA weights), one
learning-rate schedule and one gradient clip per trial, and steps them all after one backward of the
summed per-trial losses (the trials share no trainable weight, so the sum's gradient is each loss's own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class PackedLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, specs: Sequence[LoraSpec] = ()):
        super().__init__()
        self.base = base
        self.specs: list[LoraSpec] = []
        self.lora_A = nn.ModuleList()
        self.lora_B = nn.ModuleList()
        self.slices: list[tuple[int, int, int]] = []
        """(trial, first row, end row) of each block of the packed batch, in row order."""
        self.stack: _Stack | None = None
        """The stacked adapters (stack_adapters), or None before any."""
        self.plan: _Plan | None = None
        """Where the blocks' adapters sit in the stack (set_slices), or None: one trial after another."""
        for spec in specs:
            self.add_adapter(spec)

    def add_adapter(self, spec: LoraSpec) -> int:
        """A new trial's adapter, on the base's device, PEFT's default init (B = 0: a fresh adapter is a
        no-op); returns its index. It joins the stacked adapters at the next ``stack_adapters``."""
        device = self.base.weight.device
        a = nn.Linear(self.base.in_features, spec.r, bias=False, device=device)
        b = nn.Linear(spec.r, self.base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A.append(a)
        self.lora_B.append(b)
        self.specs.append(spec)
        return len(self.specs) - 1

    def restack(self, trials: Sequence[int]) -> None:
        """Stack these trials' adapters (their current values) into fresh tensors, their weights then views
        into their slots."""
        if not trials:
            self.stack = None
            return
        specs = [self.specs[t] for t in trials]
        rank = max(s.r for s in specs)
        a0 = self.lora_A[trials[0]].weight
        A = torch.zeros((len(trials), rank, self.base.in_features), dtype=a0.dtype, device=a0.device)
        Bt = torch.zeros((len(trials), rank, self.base.out_features), dtype=a0.dtype, device=a0.device)
        with torch.no_grad():
            for i, (t, spec) in enumerate(zip(trials, specs)):
                A[i, : spec.r].copy_(self.lora_A[t].weight)
                Bt[i, : spec.r].copy_(self.lora_B[t].weight.t())
                self.lora_A[t].weight.data = A[i, : spec.r]  # the trial's weights now read and update its slot
                self.lora_B[t].weight.data = Bt[i, : spec.r].t()
        scalings, dropouts = [s.scaling for s in specs], [s.dropout for s in specs]
        self.stack = _Stack(tuple(trials), A.requires_grad_(True), Bt.requires_grad_(True),
                            _per_slot(scalings, a0.device), _per_slot(dropouts, a0.device))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.slices:
            raise RuntimeError("PackedLoraLinear: set_slices() first (which rows belong to which trial)")
        if self.plan is not None:
            return out + self._stacked_delta(x, self.plan).to(out.dtype)
        parts = []
        for t, start, stop in self.slices:
            spec = self.specs[t]
            xt = x[start:stop]
            if spec.dropout and self.training:
                xt = nn.functional.dropout(xt, spec.dropout)
            a = self.lora_A[t]
            delta = self.lora_B[t](a(xt.to(a.weight.dtype))) * spec.scaling
            parts.append(out[start:stop] + delta.to(out.dtype))
        return torch.cat(parts)

    def _stacked_delta(self, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Every block's ``scaling * B(A(dropout(x)))`` as two batched matmuls over the stacked adapters."""
        st = self.stack
        A, Bt, scaling, dropout = st.A, st.Bt, st.scaling, st.dropout
        if plan.index is not None:  # some of the stacked trials, or another order
            A, Bt = A.index_select(0, plan.index), Bt.index_select(0, plan.index)
            scaling = scaling.index_select(0, plan.index) if isinstance(scaling, torch.Tensor) else scaling
            dropout = dropout.index_select(0, plan.index) if isinstance(dropout, torch.Tensor) else dropout
        xs = x.reshape(len(plan.positions), -1, x.shape[-1])  # block i: the rows of slice i, in order
        if self.training and (isinstance(dropout, torch.Tensor) or dropout):
            xs = _dropout(xs, dropout)
        d = torch.bmm(torch.bmm(xs.to(A.dtype), A.transpose(1, 2)), Bt) * scaling
        return d.reshape(*x.shape[:-1], d.shape[-1])

    def adapter_params(self, t: int) -> list[nn.Parameter]:
        return [self.lora_A[t].weight, self.lora_B[t].weight]

    def drop_adapter(self, t: int) -> None:
        """Free trial t's weights (it left: its rows never come back); the other trials keep their indices.
        Its slot stays in the stack until the next ``stack_adapters``."""
        self.lora_A[t] = nn.Identity()
        self.lora_B[t] = nn.Identity()


@dataclass
class _Stack:
    """A layer's adapters of ``trials``, in that order: A [trials, rank, in], Bᵀ [trials, rank, out]
    (each slot zero-padded to the largest rank), and each slot's scaling and dropout (one number when
    every slot has the same, else a [trials, 1, 1] tensor)."""

    trials: tuple[int, ...]
    A: torch.Tensor
    Bt: torch.Tensor
    scaling: Any
    dropout: Any
    _grad_views: tuple = ()

    def grad_views(self, specs: Sequence[LoraSpec]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each slot's (A gradient, B gradient), views of the stacked gradients; made once for as long as
        the stacked gradients are the same tensors (a CUDA graph's replays)."""
        ga, gb = self.A.grad, self.Bt.grad
        # the cache holds the gradients it was made from, so "is" cannot match a new tensor at a reused address
        if not self._grad_views or self._grad_views[0] is not ga or self._grad_views[1] is not gb:
            views = [(ga[i, : specs[t].r], gb[i, : specs[t].r].t()) for i, t in enumerate(self.trials)]
            self._grad_views = (ga, gb, views)
        return self._grad_views[2]


@dataclass(frozen=True)
class _Plan:
    """Where each block's adapter sits in the stack; ``index`` (on the device) when that is not every
    slot in order."""

    positions: tuple[int, ...]
    index: torch.Tensor | None


def _per_slot(values: Sequence[float], device: torch.device) -> Any:
    return values[0] if len(set(values)) == 1 else _on_device(tuple(values), device, (-1, 1, 1))


def _dropout(xs: torch.Tensor, p: Any) -> torch.Tensor:
    """Dropout of each block with its own probability (``p``: a number, or [blocks, 1, 1])."""
    if not isinstance(p, torch.Tensor):
        return nn.functional.dropout(xs, p)
    keep = torch.rand(xs.shape, device=xs.device) >= p
    return xs * keep / (1.0 - p)


def pack_lora(model: nn.Module, target_modules: Sequence[str], specs: Sequence[LoraSpec]) -> dict[str, PackedLoraLinear]:
    """Freeze ``model`` and wrap every linear layer whose name ends in one of ``target_modules`` (as
    PEFT matches them) with a PackedLoraLinear of one adapter per spec; returns {name: layer}."""
    for p in model.parameters():
        p.requires_grad_(False)
    packed: dict[str, PackedLoraLinear] = {}
    # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear subclasses
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in set(target_modules)]
    for name in names:
        layer = PackedLoraLinear(model.get_submodule(name), specs)
        model.set_submodule(name, layer)
        packed[name] = layer
    if not packed:
        raise ValueError(f"target_modules {list(target_modules)}: no linear layer of the model matches")
    return packed


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _on_device(values: tuple, device: torch.device, shape: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """``values`` (per-slot scalings or dropouts, stack positions) as a tensor of ``shape`` on ``device``,
    made once per combination: a copy to the GPU at every step (decoding sets its blocks at each one)
    would make the host wait for it."""
    key = (str(device), values, shape)
    if key not in _CONSTANTS:
        # a plain tensor even when first asked for while decoding under inference_mode: training steps
        # save it for backward, which an inference tensor cannot be
        with torch.inference_mode(False):
            _CONSTANTS[key] = torch.tensor(values, device=device).view(shape)
    return _CONSTANTS[key]


def set_slices(layers: dict[str, PackedLoraLinear], slices: Sequence[tuple[int, int, int]]) -> None:
    """(trial, first row, end row) of each block of the next packed batch: trials that have finished
    (or left the pack) simply have no block. Equal blocks one after another, all of stacked trials, run
    through the stacked adapters; others one trial after another. Every layer holds the same trials,
    so the plan is made once."""
    first = next(iter(layers.values()), None)
    plan = _plan(first, slices) if first is not None else None
    for layer in layers.values():
        layer.slices = list(slices)
        layer.plan = plan


def _plan(layer: PackedLoraLinear, slices: Sequence[tuple[int, int, int]]) -> _Plan | None:
    if layer.stack is None or not slices:
        return None
    size = slices[0][2] - slices[0][1]
    if size <= 0 or any(start != i * size or stop != start + size for i, (_, start, stop) in enumerate(slices)):
        return None
    where = {t: i for i, t in enumerate(layer.stack.trials)}
    if any(t not in where for t, _, _ in slices):
        return None
    positions = tuple(where[t] for t, _, _ in slices)
    if positions == tuple(range(len(where))):
        return _Plan(positions, None)
    return _Plan(positions, _on_device(positions, layer.stack.A.device))


def stack_adapters(layers: dict[str, PackedLoraLinear], trials: Sequence[int]) -> None:
    """Stack these trials' adapters in every layer, in this order (PackedLoraLinear.restack)."""
    for layer in layers.values():
        layer.restack(list(trials))


def stacked_tensors(layers: dict[str, PackedLoraLinear]) -> list[torch.Tensor]:
    """The tensors a training step's gradients go to: every layer's stacked A and Bᵀ."""
    return [t for layer in layers.values() if layer.stack is not None for t in (layer.stack.A, layer.stack.Bt)]


def hand_out_grads(layers: dict[str, PackedLoraLinear], trials: Sequence[int]) -> None:
    """These trials' adapter weights get their slots of the stacked gradients (views, no copy)."""
    wanted = set(trials)
    for layer in layers.values():
        st = layer.stack
        if st is None or st.A.grad is None:
            continue
        for t, (ga, gb) in zip(st.trials, st.grad_views(layer.specs)):
            if t in wanted:
                layer.lora_A[t].weight.grad, layer.lora_B[t].weight.grad = ga, gb


def load_peft_adapter(layers: dict[str, PackedLoraLinear], t: int, state: dict[str, torch.Tensor]) -> None:
    """Trial ``t``'s A and B from a PEFT LoRA state dict (``get_peft_model_state_dict`` keys:
    ``base_model.model.<name>.lora_A.weight``)."""
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A[t].weight.copy_(state[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B[t].weight.copy_(state[f"base_model.model.{name}.lora_B.weight"])


def peft_adapter_state(layers: dict[str, PackedLoraLinear], t: int) -> dict[str, torch.Tensor]:
    """Trial ``t``'s adapter under PEFT's saved key names (``set_peft_model_state_dict`` loads it)."""
    state = {}
    for name, layer in layers.items():
        state[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[t].weight.detach().clone()
        state[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[t].weight.detach().clone()
    return state


@dataclass
class TrialOptim:
    learning_rate: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 1
    scheduler: str = "linear"
    fused: bool = False
    """torch's fused AdamW (one kernel a step), as a trial alone on the GPU fast path steps."""


class PackedTrials:
    """One optimizer, schedule and gradient clip per trial over its own adapter weights; trials may
    be added (``add``) and removed (``remove``) between steps."""

    def __init__(self, layers: dict[str, PackedLoraLinear], optims: Sequence[TrialOptim] = ()):
        self.layers = layers
        self.optims: dict[int, TrialOptim] = {}
        self.params: dict[int, list[nn.Parameter]] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.schedulers: dict[int, Any] = {}
        self.version = 0
        """Counts restacks: what captured the stacked adapters' addresses is stale when it changes."""
        for t, o in enumerate(optims):
            self.add(t, o)

    def add(self, t: int, o: TrialOptim) -> None:
        """Trial t (its adapter added to every layer) gets its optimizer and schedule; the adapters restack."""
        from transformers import get_scheduler

        params = [p for layer in self.layers.values() for p in layer.adapter_params(t)]
        # the HF Trainer's groups for LoRA weights: every one decays (none is a bias or a norm)
        opt = torch.optim.AdamW([{"params": params, "weight_decay": o.weight_decay}], lr=o.learning_rate,
                                fused=o.fused or None)  # fmt: skip
        self.optims[t], self.params[t], self.optimizers[t] = o, params, opt
        self.schedulers[t] = get_scheduler(o.scheduler, opt, num_warmup_steps=o.warmup_steps,
                                           num_training_steps=o.total_steps)  # fmt: skip
        self._restack()

    def remove(self, t: int) -> None:
        """Trial t leaves: its optimizer state is dropped, its adapter stops taking gradients and leaves the stack."""
        for d in (self.optims, self.params, self.optimizers, self.schedulers):
            d.pop(t, None)
        for layer in self.layers.values():
            for p in layer.adapter_params(t):
                p.requires_grad_(False)
                p.grad = None
        self._restack()

    def load_optimizer_state(self, t: int, state: dict) -> None:
        """Trial t's optimizer state from ``state_dict()``, each tensor laid out as its parameter (a B
        weight is a transposed view into the stack; torch's fused AdamW wants its states alike)."""
        opt = self.optimizers[t]
        opt.load_state_dict(state)
        for p in self.params[t]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p).copy_(v)

    def _restack(self) -> None:
        # a captured step's clip hands every stacked trial views of the stacked gradients (those not
        # stepping keep theirs): dropped here, they would keep the old stack's gradients allocated
        for params in self.params.values():
            for p in params:
                p.grad = None
        stack_adapters(self.layers, sorted(self.optimizers))
        self.version += 1

    @property
    def order(self) -> list[int]:
        """The trials in stack order: a training step's blocks, one per trial."""
        first = next(iter(self.layers.values()), None)
        return list(first.stack.trials) if first is not None and first.stack is not None else []

    @staticmethod
    def losses(model: nn.Module, joined: dict[str, torch.Tensor], blocks: int) -> torch.Tensor:
        """Each block's loss over a joined batch of ``blocks`` equal blocks of rows, stacked: the mean
        cross-entropy over its label tokens, as HF computes it (NaN for a block without any; its
        gradient is zero)."""
        logits = model(input_ids=joined["input_ids"], attention_mask=joined["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), joined["labels"][:, 1:]
        per_token = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                                ignore_index=-100, reduction="none").view(shift_labels.shape)  # fmt: skip
        sums = per_token.view(blocks, -1).sum(1)
        counts = (shift_labels != -100).view(blocks, -1).sum(1)
        # a block without label tokens: NaN, as HF's loss of such a batch is, but no NaN gradient (a
        # trial that is not stepping has such a block in every step)
        empty = torch.where(counts > 0, 0.0, float("nan"))
        return sums / counts.clamp(min=1) + empty

    def clip(self, trials: Sequence[int]) -> None:
        """Each of these trials' gradient clip (torch's, as the HF Trainer clips a trial alone) over its
        slots of the stacked gradients. A trial without a batch in the step has zero gradients, which a
        clip leaves as they are, so a captured step clips every stacked trial and serves any of them."""
        hand_out_grads(self.layers, trials)
        for t in trials:
            if self.optims[t].max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params[t], self.optims[t].max_grad_norm)

    def step(self, model: nn.Module, batches: dict[int, dict[str, torch.Tensor]],
             forward_backward: Callable[..., torch.Tensor] | None = None, autocast_bf16: bool = False) -> dict[int, float]:  # fmt: skip
        """One optimizer step of each trial in ``batches`` ({trial: its batch}, equal shapes) on its own
        batch; returns each one's loss (``losses``). Every stacked trial has a block, in stack order: a
        trial without a batch gets rows without labels (a NaN loss, zero gradients), and its weights and
        optimizer state do not move. ``forward_backward(trials, bounds, joined)``, when given, runs the
        forward, the backward and every stacked trial's ``clip`` instead (a CUDA graph of them) and
        returns the detached losses.
        ``autocast_bf16``: the forward runs under bf16 autocast, as a trial alone's HF Trainer runs it."""
        trials = self.order
        if any(t not in trials for t in batches):
            raise ValueError(f"PackedTrials.step: trials {sorted(set(batches) - set(trials))} have no optimizer here")
        first = next(iter(batches.values()))
        idle = {**first, "labels": torch.full_like(first["labels"], -100)}
        rows = first["input_ids"].shape[0]
        bounds = [i * rows for i in range(len(trials) + 1)]
        set_slices(self.layers, [(t, bounds[i], bounds[i + 1]) for i, t in enumerate(trials)])
        joined = {k: torch.cat([batches.get(t, idle)[k] for t in trials]) for k in ("input_ids", "attention_mask", "labels")}
        stacked = stacked_tensors(self.layers)
        for p in stacked:  # the backward writes them afresh (a graph's replay hands back its own)
            p.grad = None
        if forward_backward is None:
            with torch.autocast(first["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                losses = self.losses(model, joined, len(trials))
            losses.sum().backward()
            self.clip(list(batches))
        else:
            losses = forward_backward(trials, bounds, joined)
            hand_out_grads(self.layers, list(batches))
        for t in batches:
            self.optimizers[t].step()
            self.schedulers[t].step()
            self.optimizers[t].zero_grad(set_to_none=True)
        values = losses.detach().tolist()  # one wait for the GPU, not one a trial
        return {t: values[trials.index(t)] for t in batches}
