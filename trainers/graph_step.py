"""A training micro-batch's forward, loss and backward captured once as a CUDA graph and replayed.

At the study's size (batch 2 x 128 on a 135M-1B model) a step is a few milliseconds of GPU work
behind ~100 ms of Python issuing ~3,000 kernels; a replayed graph issues them all in one call.
What a graph needs, and how the trial provides it:

- static shapes: the collator pads every batch to ``max_seq_len``; a batch of another shape (the
  last, short batch of an epoch) runs eagerly;
- static addresses: the inputs are copied into buffers the graph reads; the weights are updated in
  place (torch's fused AdamW, the fused GaLore optimizer); the gradients live in the graph's own
  memory and are handed back to the parameters after each replay (the Trainer sets them to None);
- no host synchronisation inside the step: bitsandbytes' LLM.int8 layers find their outlier columns
  with a data-dependent shape, so they take the static-shape version of their matmul
  (trainers/int8_static.py, ``prepare_for_graphs``);
- warm-up: the first step runs eagerly on a side stream, as CUDA graph capture requires; capture
  uses that same stream, since every stream that runs matrix products holds a cuBLAS workspace of
  its own (tens of MB of allocated memory).

Random ops (LoRA dropout) draw fresh numbers on each replay: PyTorch registers its CUDA generator
with the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext

import torch

log = logging.getLogger(__name__)


def prepare_for_graphs(model: torch.nn.Module) -> str | None:
    """Make the model's step capturable where it can be, and say why it cannot (None: it can).
    bitsandbytes' LLM.int8 matmul searches for outlier columns on the host every call; its layers
    take the static-shape version of the same matmul (trainers/int8_static.py)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()):
        from duetto.trainers.int8_static import use_static_int8

        try:
            use_static_int8(model)
        except ValueError as e:
            return f"LLM.int8 layers: {e}"
    return None


class GraphedStep:
    """Call with a micro-batch (tensors on the GPU): runs forward + backward, returns the loss."""

    def __init__(self, model: torch.nn.Module, *, autocast_bf16: bool, warmup_steps: int = 1,
                 loss_fn: Callable[[dict], torch.Tensor] | None = None,
                 side_stream: torch.cuda.Stream | None = None, params: list[torch.nn.Parameter] | None = None,
                 after_backward: Callable[[], None] | None = None):  # fmt: skip
        """``loss_fn(inputs)``: the loss to take the gradient of (its sum, when it has several values,
        as a pack's per-trial losses); the model's own ``.loss`` by default. ``side_stream``: the stream
        to warm up and capture on, for steps that share one (each stream that runs matrix products
        holds a cuBLAS workspace of its own); a new one by default. ``params``: the weights the step
        trains (their gradients are the graph's); those that require a gradient by default.
        ``after_backward()``: work on the fresh gradients that belongs to every step (a pack's gradient
        clips), captured with it; it must not wait for the GPU."""
        self.model = model
        self.loss_fn = loss_fn or (lambda inputs: self.model(**inputs).loss)
        self.autocast_bf16 = autocast_bf16
        self.warmup_steps = warmup_steps
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self._key = None
        self._eager_seen = 0
        self._static: dict[str, torch.Tensor] = {}
        self._loss: torch.Tensor | None = None
        self._grads: list[torch.Tensor | None] = []
        self.replays = 0
        self._side = side_stream
        self.after_backward = after_backward

    def _forward_backward(self, inputs: dict) -> torch.Tensor:
        # autocast's weight-cast cache cannot live across graph replays
        ctx = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.autocast_bf16 else nullcontext()
        with ctx:
            loss = self.loss_fn(inputs)
        (loss.sum() if loss.dim() else loss).backward()
        if self.after_backward is not None:
            self.after_backward()
        return loss.detach()

    @staticmethod
    def _shape_key(inputs: dict):
        return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in inputs.items()))

    def eager(self, inputs: dict) -> torch.Tensor:
        """The same step without the graph (steps that must run Python inside backward, odd shapes).
        Before capture it runs as a warm-up, so a trial whose first step must be eager (GaLore's first
        projection refresh) captures on its second."""
        if self.graph is None and self.failed is None:
            return self._warm_up(inputs, self._shape_key(inputs))
        return self._forward_backward(inputs)

    def __call__(self, inputs: dict) -> torch.Tensor:
        key = self._shape_key(inputs)
        if self.graph is not None and key == self._key:
            for k, v in inputs.items():
                self._static[k].copy_(v, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            for p, g in zip(self.params, self._grads):
                if g is not None:
                    p.grad = g
            return self._loss
        if self.graph is not None or self.failed is not None:
            return self._forward_backward(inputs)
        if key == self._key and self._eager_seen >= self.warmup_steps:
            return self._capture(inputs, key)
        return self._warm_up(inputs, key)

    def _warm_up(self, inputs: dict, key) -> torch.Tensor:
        """An eager step on the side stream that capture will use, as CUDA graph capture requires."""
        if key != self._key:
            self._key, self._eager_seen = key, 0
        self._eager_seen += 1
        side = self._side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self._forward_backward(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream()
        return self._side

    def _capture(self, inputs: dict, key) -> torch.Tensor:
        self._static = {k: v.clone() for k, v in inputs.items()}
        for p in self.params:
            p.grad = None  # so the graph allocates the gradients it writes (and writes, not accumulates)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._side_stream()):
                loss = self._forward_backward(self._static)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager step, which works
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture failed; the trial continues with eager steps (%s)", self.failed)
            torch.cuda.synchronize()
            for p in self.params:
                p.grad = None
            return self._forward_backward(inputs)
        self.graph, self._key, self._loss = graph, key, loss
        self._grads = [p.grad for p in self.params]
        graph.replay()  # capture records the work; the replay does it
        self.replays += 1
        return loss
