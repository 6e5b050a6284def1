"""Several QLoRA trials on one frozen base: each trial's rows pass through the shared base once and
through its own LoRA adapter, in the same forward and backward.

``PackedLoraLinear`` wraps a base linear layer (plain or bitsandbytes 4/8-bit) with one LoRA adapter
per trial (its own rank, alpha and dropout). A packed batch holds the trials' rows one block after
the other; ``set_slices`` tells every packed layer which rows are whose. The base runs once over all
rows; each block then adds its own trial's ``scaling * B(A(dropout(x)))``: in a training step, whose
blocks are equal, trials of one rank and dropout run as one batched matmul (``torch.bmm`` over their
stacked adapters), so a step's kernel count grows with the number of ranks, not of trials. Plain
autograd carries each trial's gradients to its own weights: exactly those of its rows alone.

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
        self.groups: list[_Group] | None = None
        """How the blocks' adapters run batched (set_slices), or None: one after another."""
        for spec in specs:
            self.add_adapter(spec)

    def add_adapter(self, spec: LoraSpec) -> int:
        """A new trial's adapter, on the base's device, PEFT's default init (B = 0: a fresh adapter is a
        no-op); returns its index."""
        device = self.base.weight.device
        a = nn.Linear(self.base.in_features, spec.r, bias=False, device=device)
        b = nn.Linear(spec.r, self.base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A.append(a)
        self.lora_B.append(b)
        self.specs.append(spec)
        return len(self.specs) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.slices:
            raise RuntimeError("PackedLoraLinear: set_slices() first (which rows belong to which trial)")
        if self.groups is not None:
            return out + self._grouped_delta(x).to(out.dtype)
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

    def _grouped_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's ``scaling * B(A(dropout(x)))`` with a few batched matmuls per group of trials of one
        rank and dropout, instead of a few small ones per trial: the blocks are equal, so they stack."""
        n = len(self.slices)
        blocks = x.reshape(n, -1, x.shape[-1])  # block i: the rows of slice i, in order
        found: list[torch.Tensor | None] = [None] * n
        for g in self.groups:
            p = g.positions
            xs = blocks[p[0] : p[-1] + 1] if p[-1] - p[0] == len(p) - 1 else torch.stack([blocks[i] for i in p])
            if g.dropout and self.training:
                xs = nn.functional.dropout(xs, g.dropout)
            A = torch.stack([self.lora_A[t].weight for t in g.trials])
            B = torch.stack([self.lora_B[t].weight for t in g.trials])
            d = torch.bmm(torch.bmm(xs.to(A.dtype), A.transpose(1, 2)), B.transpose(1, 2)) * g.scaling
            if len(self.groups) == 1:  # every block, in order
                return d.reshape(*x.shape[:-1], d.shape[-1])
            for j, i in enumerate(p):
                found[i] = d[j]
        return torch.cat(found).reshape(*x.shape[:-1], -1)

    def adapter_params(self, t: int) -> list[nn.Parameter]:
        return [self.lora_A[t].weight, self.lora_B[t].weight]

    def drop_adapter(self, t: int) -> None:
        """Free trial t's weights (it left: its rows never come back); the other trials keep their indices."""
        self.lora_A[t] = nn.Identity()
        self.lora_B[t] = nn.Identity()


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


@dataclass
class _Group:
    """Trials of one rank and dropout whose blocks of a packed batch run through one batched matmul."""

    trials: list[int]
    positions: list[int]  # where their blocks are among the batch's blocks, in order
    dropout: float
    scaling: Any  # a float, or a (trials, 1, 1) tensor where their scalings differ


def _groups(layer: PackedLoraLinear, slices: Sequence[tuple[int, int, int]]) -> list[_Group] | None:
    """The batched plan for ``slices``, or None where they are not equal blocks one after another from
    row 0 (interim reports decode blocks of any size: those run one trial after another)."""
    if len(slices) < 2:
        return None
    size = slices[0][2] - slices[0][1]
    if size <= 0 or any(start != i * size or stop != start + size for i, (_, start, stop) in enumerate(slices)):
        return None
    by_key: dict[tuple[int, float], list[int]] = {}
    for i, (t, _, _) in enumerate(slices):
        spec = layer.specs[t]
        by_key.setdefault((spec.r, spec.dropout), []).append(i)
    groups = []
    for (_, dropout), positions in by_key.items():
        trials = [slices[i][0] for i in positions]
        scalings = [layer.specs[t].scaling for t in trials]
        scaling = scalings[0] if len(set(scalings)) == 1 else _scaling_tensor(tuple(scalings), layer.base.weight.device)
        groups.append(_Group(trials, positions, dropout, scaling))
    return groups


_SCALINGS: dict[tuple, torch.Tensor] = {}


def _scaling_tensor(scalings: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(trials, 1, 1) scalings on ``device``, made once per combination: copying a new one to the GPU at
    every step would make the host wait for it."""
    key = (str(device), scalings)
    if key not in _SCALINGS:
        # a plain tensor even when first asked for while decoding under inference_mode: training steps
        # save it for backward, which an inference tensor cannot be
        with torch.inference_mode(False):
            _SCALINGS[key] = torch.tensor(scalings, device=device).view(-1, 1, 1)
    return _SCALINGS[key]


def set_slices(layers: dict[str, PackedLoraLinear], slices: Sequence[tuple[int, int, int]]) -> None:
    """(trial, first row, end row) of each block of the next packed batch: trials that have finished
    (or left the pack) simply have no block. Equal blocks one after another run batched; others one
    trial after another. Every layer holds the same trials' specs, so the plan is made once."""
    first = next(iter(layers.values()), None)
    plan = _groups(first, slices) if first is not None else None
    for layer in layers.values():
        layer.slices = list(slices)
        layer.groups = plan


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


class PackedTrials:
    """One optimizer, schedule and gradient clip per trial over its own adapter weights; trials may
    be added (``add``) and removed (``remove``) between steps."""

    def __init__(self, layers: dict[str, PackedLoraLinear], optims: Sequence[TrialOptim] = ()):
        self.layers = layers
        self.optims: dict[int, TrialOptim] = {}
        self.params: dict[int, list[nn.Parameter]] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.schedulers: dict[int, Any] = {}
        for t, o in enumerate(optims):
            self.add(t, o)

    def add(self, t: int, o: TrialOptim) -> None:
        from transformers import get_scheduler

        params = [p for layer in self.layers.values() for p in layer.adapter_params(t)]
        # the HF Trainer's groups for LoRA weights: every one decays (none is a bias or a norm)
        opt = torch.optim.AdamW([{"params": params, "weight_decay": o.weight_decay}], lr=o.learning_rate)
        self.optims[t], self.params[t], self.optimizers[t] = o, params, opt
        self.schedulers[t] = get_scheduler(o.scheduler, opt, num_warmup_steps=o.warmup_steps,
                                           num_training_steps=o.total_steps)  # fmt: skip

    def remove(self, t: int) -> None:
        """Trial t leaves: its optimizer state is dropped and its adapter stops taking gradients."""
        for d in (self.optims, self.params, self.optimizers, self.schedulers):
            d.pop(t, None)
        for layer in self.layers.values():
            for p in layer.adapter_params(t):
                p.requires_grad_(False)

    @staticmethod
    def losses(model: nn.Module, joined: dict[str, torch.Tensor], bounds: Sequence[int]) -> torch.Tensor:
        """Each block's loss over a joined batch (rows ``bounds[i]`` to ``bounds[i + 1]``), stacked: the
        mean cross-entropy over its label tokens, as HF computes it."""
        logits = model(input_ids=joined["input_ids"], attention_mask=joined["attention_mask"]).logits
        losses = []
        for i in range(len(bounds) - 1):
            shift_logits = logits[bounds[i] : bounds[i + 1], :-1].float()
            shift_labels = joined["labels"][bounds[i] : bounds[i + 1], 1:]
            losses.append(nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                      shift_labels.reshape(-1), ignore_index=-100))  # fmt: skip
        return torch.stack(losses)

    def step(self, model: nn.Module, batches: dict[int, dict[str, torch.Tensor]],
             forward_backward: Callable[..., torch.Tensor] | None = None) -> dict[int, float]:  # fmt: skip
        """One optimizer step of each trial in ``batches`` ({trial: its batch}, equal sequence lengths)
        on its own batch; returns each one's loss (``losses``). The other trials' weights and optimizer
        states do not move. ``forward_backward(trials, bounds, joined)``, when given, runs the forward
        and backward instead (a CUDA graph of them) and returns the detached losses."""
        trials = list(batches)
        sizes = [batches[t]["input_ids"].shape[0] for t in trials]
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        set_slices(self.layers, [(t, bounds[i], bounds[i + 1]) for i, t in enumerate(trials)])
        joined = {k: torch.cat([batches[t][k] for t in trials]) for k in ("input_ids", "attention_mask", "labels")}
        if forward_backward is None:
            losses = self.losses(model, joined, bounds)
            losses.sum().backward()
        else:
            losses = forward_backward(trials, bounds, joined)
        for t in trials:
            params, o = self.params[t], self.optims[t]
            if o.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
            self.optimizers[t].step()
            self.schedulers[t].step()
            self.optimizers[t].zero_grad(set_to_none=True)
        return dict(zip(trials, losses.detach().tolist()))  # one wait for the GPU, not one a trial

