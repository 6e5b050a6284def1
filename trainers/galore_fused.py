"""GaLore's 8-bit AdamW (galore-torch ``GaLoreAdamW8bit``) stepped in a few fused groups.

Why not the library's optimizer on the GPU path: it steps one parameter at a time (a projection, a
bitsandbytes call, a ``torch.cuda.synchronize()`` and a projection back per weight: 272 host round
trips a step on SmolLM2) and replaces each weight's storage every step (``p.data = ...``), which a
captured CUDA graph cannot follow. This optimizer computes the same update with the same kernels:

- weights of one shape share a group: their low-rank gradients, 8-bit Adam states and projection
  matrices are stacked, so one bitsandbytes ``optimizer_update_8bit_blockwise`` call and one batched
  matmul serve all of them. bitsandbytes quantizes its states in blocks of 256 values, so stacking
  tensors whose sizes are multiples of 256 gives the same blocks as separate calls (other tensors
  keep a group of their own);
- the weights are updated in place, so their addresses never change;
- layer-wise mode projects each gradient inside backward (a post-accumulate-grad hook) and frees the
  full-rank gradient there, as the library's layer-wise optimizer does, so full gradients of all
  projected weights never coexist; the Adam step then runs once after backward;
- a projection refresh makes the library's own SVD call for each weight, several at once on CUDA
  streams (trainers/refresh_pool.py);
- nothing the size of all weights is allocated: a lone tensor (the embedding) steps in place, and
  the low-rank updates are projected back a few weights at a time.

The hyper-parameters come from the param groups HF's ``galore_adamw_8bit`` set-up builds (lr, betas,
eps, weight_decay, rank, update_proj_gap, scale, proj_type), so both paths train with the same
settings. ``proj_type: full`` has no fused form (the trial then uses the library's optimizer).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable

import torch

from duetto.trainers.refresh_pool import RefreshPool

#: bitsandbytes' block size for its 8-bit optimizer states (Optimizer2State.init_state)
BNB_BLOCK = 256
#: bitsandbytes keeps 32-bit states for tensors smaller than this (Optimizer8bit's min_8bit_size)
MIN_8BIT_SIZE = 4096
FUSED_PROJ_TYPES = ("std", "reverse_std", "right", "left")
#: full-size updates projected back at once: bounds the step's scratch memory (16 MB in bf16)
BACK_CHUNK_ELEMENTS = 1 << 23


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """``right`` (G @ Vᵀ, V of rank × n) or ``left`` (Uᵀ @ G, U of m × rank), as GaLoreProjector picks it."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left"):
        return proj_type
    raise ValueError(f"galore.proj_type: {proj_type!r} has no fused form (fused: {', '.join(FUSED_PROJ_TYPES)})")


class _AdamState:
    """bitsandbytes Adam states for one flat buffer of ``numel`` values (8-bit blockwise or 32-bit)."""

    def __init__(self, numel: int, device, eight_bit: bool, quirks: dict):
        import bitsandbytes.functional as F

        self.eight_bit = eight_bit
        self.skip_zeros = bool(quirks.get("skip_zeros", False))
        self.max_unorm = float(quirks.get("max_unorm", 0.0))
        self.unorm_vec = torch.zeros(1, device=device) if self.max_unorm > 0 and not eight_bit else None
        if eight_bit:
            self.state1 = torch.zeros(numel, dtype=torch.uint8, device=device)
            self.state2 = torch.zeros(numel, dtype=torch.uint8, device=device)
            blocks = numel // BNB_BLOCK + bool(numel % BNB_BLOCK)
            self.absmax1 = torch.zeros(blocks, dtype=torch.float32, device=device)
            self.absmax2 = torch.zeros(blocks, dtype=torch.float32, device=device)
            self.qmap1 = F.create_dynamic_map(signed=True).to(device)
            self.qmap2 = F.create_dynamic_map(signed=False).to(device)
        else:
            self.state1 = torch.zeros(numel, dtype=torch.float32, device=device)
            self.state2 = torch.zeros(numel, dtype=torch.float32, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        keys = ("state1", "state2", "absmax1", "absmax2") if self.eight_bit else ("state1", "state2")
        return {k: getattr(self, k) for k in keys}

    @property
    def clips(self) -> bool:
        """bitsandbytes needs the weight's norm on the host for this state's update (``max_unorm``)."""
        return not self.eight_bit and self.max_unorm > 0

    def update(self, g: torch.Tensor, p: torch.Tensor, group: dict, step: int, weight_decay: float,
               param_norm: float | None = None) -> None:
        """One bitsandbytes Adam step of flat ``p`` with flat gradient ``g``, in place. ``param_norm``:
        ``torch.norm(p.float())`` already read (see ``clips``), else the library reads it, a host wait."""
        import bitsandbytes.functional as F

        beta1, beta2 = group["betas"][:2]
        if self.clips and param_norm is not None:  # F.optimizer_update_32bit's own call, norm given
            torch.ops.bitsandbytes.optimizer_update_32bit("adam", g, p, self.state1, self.state2, self.unorm_vec,
                                                          self.max_unorm, param_norm, beta1, beta2, 0.0, 0.0,
                                                          group["eps"], weight_decay, step, group["lr"], 1.0,
                                                          self.skip_zeros)  # fmt: skip
        elif self.eight_bit:
            F.optimizer_update_8bit_blockwise("adam", g, p, self.state1, self.state2, beta1, beta2, 0.0, 0.0,
                                              group["eps"], step, group["lr"], self.qmap1, self.qmap2, self.absmax1,
                                              self.absmax2, weight_decay, gnorm_scale=1.0,
                                              skip_zeros=self.skip_zeros)  # fmt: skip
        else:
            F.optimizer_update_32bit("adam", g, p, self.state1, beta1, group["eps"], step, group["lr"], self.state2,
                                     beta2, 0.0, 0.0, weight_decay, 1.0, self.unorm_vec, max_unorm=self.max_unorm,
                                     skip_zeros=self.skip_zeros)  # fmt: skip


class _PlainGroup:
    """Weights without projection (embeddings, norms): bitsandbytes AdamW on their concatenation."""

    def __init__(self, params: list[torch.nn.Parameter], group: dict, eight_bit: bool, quirks: dict):
        self.params, self.group = params, group
        numel = sum(p.numel() for p in params)
        self.adam = _AdamState(numel, params[0].device, eight_bit, quirks)
        if len(params) > 1:
            self.flat_p = torch.empty(numel, dtype=params[0].dtype, device=params[0].device)
            self.flat_g = torch.empty_like(self.flat_p)

    @property
    def views(self) -> list[torch.Tensor]:
        """The weights, flattened; taken at each step, since a weight's storage may move between steps
        (stacked GaLore trials: trainers/stacked_galore.py)."""
        return [p.detach().view(-1) for p in self.params]

    def step(self, step: int, param_norm: float | None = None) -> None:
        if len(self.params) == 1:  # a lone tensor (the embedding: 0.6 GB on gemma-3-1b) steps in place
            p, flat = self.params[0], self.views[0]
            g = p.grad.view(-1) if p.grad is not None else torch.zeros_like(flat)
            self.adam.update(g, flat, self.group, step, self.group["weight_decay"], param_norm)
            return
        views = self.views
        grads = [p.grad.view(-1) if p.grad is not None else torch.zeros_like(v) for p, v in zip(self.params, views)]
        torch.cat(grads, out=self.flat_g)
        torch.cat(views, out=self.flat_p)
        self.adam.update(self.flat_g, self.flat_p, self.group, step, self.group["weight_decay"])
        torch._foreach_copy_(views, list(self.flat_p.split([v.numel() for v in views])))


class _SmallGroup:
    """Same-size small weights (32-bit states; the norms) that bitsandbytes clips one by one (``max_unorm``):
    its 32-bit Adam computed in torch for all of them at once, each update clipped by its own norms.

    bitsandbytes steps each such weight with kernels of its own and needs the weight's norm on the
    host first (61 weights a step on SmolLM2). This is the arithmetic of its kernels for the device:
    on CUDA (kPreconditionOptimizer32bit2State, kOptimizer32bit2State) the update's norm comes from
    the bias-corrected states, zero gradients are skipped (``skip_zeros``) and decay follows the
    update; on the CPU (its ``_optimizer_update_32bit_cpu``) the norm is the update's own, decay comes
    first and nothing is skipped. Either way the update is scaled by ``max_unorm * ||w|| / ||update||``
    where that is below 1. Tests check it against bitsandbytes on both."""

    def __init__(self, params: list[torch.nn.Parameter], group: dict, quirks: dict):
        self.params, self.group = params, group
        self.max_unorm = float(quirks.get("max_unorm", 0.0))
        self.skip_zeros = bool(quirks.get("skip_zeros", False))
        p0 = params[0]
        self.state1 = torch.zeros((len(params), p0.numel()), dtype=torch.float32, device=p0.device)
        self.state2 = torch.zeros_like(self.state1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"state1": self.state1, "state2": self.state2}

    def step(self, step: int, param_norm: float | None = None) -> None:
        grp = self.group
        beta1, beta2 = grp["betas"][:2]
        eps, lr, wd = grp["eps"], grp["lr"], grp["weight_decay"]
        cuda = self.state1.device.type == "cuda"
        views = [p.detach().view(-1) for p in self.params]
        p = torch.stack(views)
        pf = p.float()
        g = torch.stack([q.grad.view(-1) if q.grad is not None else torch.zeros_like(v)
                         for q, v in zip(self.params, views)]).float()  # fmt: skip
        s1 = torch.add(self.state1 * beta1, g, alpha=1.0 - beta1)
        s2 = torch.addcmul(self.state2 * beta2, g, g, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
        direction = s1 / (s2.sqrt() + eps * bias2)
        scale = torch.ones((len(views), 1), dtype=torch.float32, device=p.device)
        if self.max_unorm > 0:
            u = (s1 * (1.0 / bias1)) / ((s2 * (1.0 / bias2**2)).sqrt() + eps) if cuda else direction
            unorm = torch.linalg.vector_norm(u, dim=1, keepdim=True)
            limit = self.max_unorm * torch.linalg.vector_norm(pf, dim=1, keepdim=True)
            scale = torch.where(unorm > limit, limit / unorm, scale)
        if wd > 0 and not cuda:
            pf = pf * (1.0 - lr * wd)
        new = pf.add(direction * scale, alpha=-lr * bias2 / bias1).to(p.dtype)  # as the CPU kernel's add_
        if wd > 0 and cuda:
            new = (new.float() * (1.0 - lr * wd)).to(p.dtype)
        # what stays as it was: zero gradients (skip_zeros, on CUDA), and weights without a gradient (the
        # library skips them)
        keep = g == 0 if self.skip_zeros and cuda else None
        missing = [i for i, q in enumerate(self.params) if q.grad is None]
        if missing:
            keep = torch.zeros_like(g, dtype=torch.bool) if keep is None else keep
            keep[missing] = True
        if keep is not None:
            new, s1, s2 = new.where(~keep, p), s1.where(~keep, self.state1), s2.where(~keep, self.state2)
        self.state1.copy_(s1)
        self.state2.copy_(s2)
        torch._foreach_copy_(views, list(new.unbind(0)))


def low_rank_shapes(shape: tuple[int, int], group: dict) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """(side, projected-gradient shape, projection shape) of a weight in a GaLore group; the rank is
    capped by the weight's size, as the SVD's factors are."""
    m, n = shape
    side = projection_side((m, n), group["proj_type"])
    k = min(int(group["rank"]), m, n)
    return (side, (m, k), (k, n)) if side == "right" else (side, (k, n), (m, k))


class _ProjectedGroup:
    """Same-shape weights with GaLore projection: stacked low-rank gradients, states and projections."""

    def __init__(self, params: list[torch.nn.Parameter], group: dict, quirks: dict):
        self.params, self.group = params, group
        p0 = params[0]
        self.side, low_shape, ortho_shape = low_rank_shapes(tuple(p0.shape), group)
        count, dev = len(params), p0.device
        self.ortho = torch.zeros((count, *ortho_shape), dtype=p0.dtype, device=dev)
        self.low = torch.zeros((count, *low_shape), dtype=p0.dtype, device=dev)  # low-rank gradients
        self.delta = torch.zeros_like(self.low)  # bitsandbytes steps this zero "weight": it becomes the update
        self.adam = _AdamState(self.low.numel(), dev, self.low[0].numel() >= MIN_8BIT_SIZE, quirks)

    def refresh(self, j: int, grad: torch.Tensor) -> None:
        """The projection from the SVD of this gradient (GaLoreProjector.get_orthogonal_matrix)."""
        # The library's call exactly: another driver (gesvda is 13x faster on an H100) returns singular
        # vectors with other signs, and the Adam states carried across a refresh then point the other
        # way, so the updates would differ from galore-torch's.
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        k = self.ortho.shape[1] if self.side == "right" else self.ortho.shape[2]
        self.ortho[j].copy_(vh[:k] if self.side == "right" else u[:, :k])

    def project(self, j: int, grad: torch.Tensor) -> None:
        if self.side == "right":
            torch.matmul(grad, self.ortho[j].t(), out=self.low[j])
        else:
            torch.matmul(self.ortho[j].t(), grad, out=self.low[j])

    def project_all(self, grads: list[torch.Tensor]) -> None:
        """``project`` of every weight's gradient, a few weights to a batched matmul."""
        chunk = max(1, BACK_CHUNK_ELEMENTS // grads[0].numel())
        for s in range(0, len(grads), chunk):
            g, o, low = torch.stack(grads[s : s + chunk]), self.ortho[s : s + chunk], self.low[s : s + chunk]
            if self.side == "right":
                torch.bmm(g, o.transpose(1, 2), out=low)
            else:
                torch.bmm(o.transpose(1, 2), g, out=low)

    def update_target(self) -> torch.Tensor:
        """What bitsandbytes steps (and takes the norm of, when it clips): the zero low-rank "weight"."""
        return self.delta.zero_()

    def step(self, step: int, param_norm: float | None = None) -> None:
        g = self.group
        self.delta.zero_()
        # GaLore: no decay on the projected update
        self.adam.update(self.low.view(-1), self.delta.view(-1), g, step, 0.0, param_norm)
        weights = [p.detach() for p in self.params]
        chunk = max(1, BACK_CHUNK_ELEMENTS // weights[0].numel())
        for s in range(0, len(weights), chunk):
            d, o = self.delta[s : s + chunk], self.ortho[s : s + chunk]
            back = torch.bmm(d, o) if self.side == "right" else torch.bmm(o, d)
            back.mul_(g["scale"])
            torch._foreach_add_(weights[s : s + chunk], list(back.unbind(0)))
        if g["weight_decay"] > 0:
            torch._foreach_add_(weights, weights, alpha=-g["lr"] * g["weight_decay"])


class FusedGaLoreAdamW8bit(torch.optim.Optimizer):
    """``GaLoreAdamW8bit`` over the same param groups, stepped in fused groups (see the module doc).

    ``layerwise=True`` projects each GaLore gradient in a backward hook and frees it there.
    """

    def __init__(self, param_groups: Iterable[dict], *, layerwise: bool, defaults: dict, quirks: dict | None = None,
                 refresher: RefreshPool | None = None):  # fmt: skip
        """``refresher``: the pool its projection refreshes run in (one shared by several optimizers lets
        their refreshes overlap); one of its own by default."""
        super().__init__(list(param_groups), defaults)
        self.layerwise = layerwise
        self.quirks = dict(quirks or {})
        self.steps_done = 0
        self.plain: list[_PlainGroup] = []
        self.small: list[_SmallGroup] = []
        self.projected: list[_ProjectedGroup] = []
        self._slot: dict[torch.nn.Parameter, tuple[_ProjectedGroup, int]] = {}
        self._hooks = []
        self._refresher: RefreshPool | None = refresher
        self._projected = False
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if "rank" in group:
                self._add_projected(params, group)
            else:
                self._add_plain(params, group)

    def _add_plain(self, params, group) -> None:
        q = self.quirks
        small = [p for p in params if p.numel() < MIN_8BIT_SIZE]
        big = [p for p in params if p.numel() >= MIN_8BIT_SIZE]
        if q.get("max_unorm", 0.0) > 0:  # each clipped by its own norm: stepped in torch, by size
            by_size: dict[tuple, list] = {}
            for p in small:
                by_size.setdefault((p.numel(), p.dtype), []).append(p)
            self.small.extend(_SmallGroup(same, group, q) for same in by_size.values())
            small = []
        # 32-bit Adam is elementwise, so any concatenation steps the same
        self._add_stacks(small, group, eight_bit=False, alone=lambda p: False)
        self._add_stacks(big, group, eight_bit=True, alone=lambda p: p.numel() % BNB_BLOCK != 0)

    def _add_stacks(self, params, group, *, eight_bit: bool, alone) -> None:
        by_dtype: dict[torch.dtype, list] = {}
        for p in params:
            if alone(p):
                self.plain.append(_PlainGroup([p], group, eight_bit, self.quirks))
            else:
                by_dtype.setdefault(p.dtype, []).append(p)
        for same in by_dtype.values():
            self.plain.append(_PlainGroup(same, group, eight_bit, self.quirks))

    def _add_projected(self, params, group) -> None:
        if params and any(p.dim() != 2 for p in params):
            raise ValueError("GaLore projects 2-D weights only")
        by_shape: dict[tuple, list] = {}
        for p in params:
            by_shape.setdefault((tuple(p.shape), p.dtype), []).append(p)
        for same in by_shape.values():
            _, (a, b), _ = low_rank_shapes(tuple(same[0].shape), group)
            low = a * b
            # stacked 8-bit states quantize in the same blocks only when each tensor fills whole blocks
            stack = low % BNB_BLOCK == 0 if low >= MIN_8BIT_SIZE else self.quirks.get("max_unorm", 0.0) <= 0
            groups = [_ProjectedGroup(same, group, self.quirks)] if stack and len(same) > 1 else [
                _ProjectedGroup([p], group, self.quirks) for p in same]  # fmt: skip
            for pg in groups:
                self.projected.append(pg)
                for j, p in enumerate(pg.params):
                    self._slot[p] = (pg, j)
                    if self.layerwise:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self._project_in_backward))

    # --- the update ---

    @property
    def refresh_due(self) -> bool:
        """This step recomputes the projections (an SVD per weight: GaLoreProjector's ``iter % gap == 0``)."""
        gaps = {int(pg.group["update_proj_gap"]) for pg in self.projected}
        return any(self.steps_done % gap == 0 for gap in gaps)

    def _refresh_for(self, pg: _ProjectedGroup) -> bool:
        return self.steps_done % int(pg.group["update_proj_gap"]) == 0

    def _refresh_pool(self) -> RefreshPool:
        if self._refresher is None:
            self._refresher = RefreshPool(self.projected[0].ortho.device)
        return self._refresher

    def _project(self, pg: _ProjectedGroup, j: int, grad: torch.Tensor) -> None:
        if self._refresh_for(pg):
            self._refresh_pool().submit(partial(pg.refresh, j), partial(pg.project, j), grad)
        else:
            pg.project(j, grad)

    def _project_in_backward(self, p: torch.nn.Parameter) -> None:
        pg, j = self._slot[p]
        self._project(pg, j, p.grad)
        p.grad = None  # the low-rank copy is all the step needs

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Not layer-wise: project every GaLore gradient now, handing this step's refreshes to the pool;
        ``step`` then waits for them. Called ahead of ``step``, it lets several optimizers that share
        a pool run their refreshes side by side (``step`` calls it otherwise)."""
        for pg in self.projected:
            grads = [p.grad for p in pg.params]
            if not self._refresh_for(pg) and all(g is not None for g in grads):
                pg.project_all(grads)
                continue
            for j, g in enumerate(grads):
                if g is None:
                    pg.low[j].zero_()
                else:
                    self._project(pg, j, g)
        self._projected = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.steps_done + 1  # bitsandbytes counts from 1 (bias correction)
        if not self.layerwise and not self._projected:
            self.project_gradients()
        self._projected = False
        if self._refresher is not None:
            self._refresher.wait()  # the refreshes this step's backward (or project_gradients) handed out
        # Projections under 4,096 values (32-bit states) that bitsandbytes clips by max_unorm need their
        # norm as a host float: read all of them with one wait instead of one per tensor.
        clipped = [pg for pg in self.projected if pg.adam.clips]
        norms: dict[_ProjectedGroup, float] = {}
        if clipped:
            targets = torch.stack([torch.norm(pg.update_target().float()) for pg in clipped])
            norms = dict(zip(clipped, targets.tolist()))
        for grp in [*self.projected, *self.plain, *self.small]:
            grp.step(step, norms.get(grp))
        self.steps_done = step
        return loss

    # --- checkpoints (exact resume: the states are copied into the existing buffers) ---

    def _buffers(self) -> list[dict[str, torch.Tensor]]:
        out = [{"ortho": pg.ortho, **pg.adam.tensors()} for pg in self.projected]
        return out + [g.adam.tensors() for g in self.plain] + [g.tensors() for g in self.small]

    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"fused_galore": 1, "steps_done": self.steps_done, "param_groups": groups,
                "buffers": [{k: t.detach().clone() for k, t in b.items()} for b in self._buffers()]}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("fused_galore") != 1:
            raise ValueError("optimizer state: not a fused GaLore checkpoint (it was saved by another optimizer; "
                             "resume with the same cuda_graphs setting)")
        mine = self._buffers()
        if len(mine) != len(state_dict["buffers"]):
            raise ValueError("optimizer state: the checkpoint's parameter groups do not match this model")
        for dst, src in zip(mine, state_dict["buffers"]):
            for k, t in dst.items():
                t.copy_(src[k])
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.steps_done = int(state_dict["steps_done"])


def hf_galore_param_groups(args, model) -> tuple[list[dict], dict, dict]:
    """(param groups, defaults, quirks) that HF's ``galore_adamw_8bit`` set-up gives ``GaLoreAdamW8bit``
    for these TrainingArguments: non-target weights, then the target Linear weights with rank, gap,
    scale and proj_type; the defaults hold lr and the library's betas, eps and weight decay.

    ``quirks`` are the bitsandbytes options the library really runs with: galore-torch 1.0 passes its
    ``percentile_clipping=100, block_wise=True`` by position, which bitsandbytes 0.50 reads as
    ``max_unorm=100, skip_zeros=True``. So 32-bit states (tensors under 4096 values) clip each update
    to 100 × the weight's norm, which for GaLore's zero-initialised low-rank "weight" means no update
    at all for projections under 4096 values, and zero gradients are skipped. The fused step does
    the same, so both paths train alike."""
    from galore_torch import GaLoreAdamW8bit
    from transformers import Trainer
    from transformers.training_args import OptimizerNames

    layerwise_name = args.optim
    args.optim = OptimizerNames.GALORE_ADAMW_8BIT  # the layer-wise name would install the library's hooks
    try:
        _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    finally:
        args.optim = layerwise_name
    groups = kwargs.pop("params")
    library = GaLoreAdamW8bit(groups, **kwargs)  # fills each group with the library's defaults
    quirks = {"max_unorm": float(library.args.max_unorm), "skip_zeros": bool(library.args.skip_zeros)}
    return library.param_groups, dict(library.defaults), quirks
