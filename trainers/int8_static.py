"""LLM.int8 matmuls of a frozen bitsandbytes 8-bit base with static shapes, so a QLoRA int8 step can be
captured as a CUDA graph.

bitsandbytes' ``MatMul8bitLt`` splits each input into outlier columns (any value at or above the
threshold, 6.0 by default) and the rest: the rest goes through an int8 matmul, the outlier columns
through a 16-bit matmul with the matching columns of the dequantized weight. It finds the outlier
columns with ``argwhere``, whose result size the host must read: a wait for the GPU in every matmul,
and a shape no CUDA graph can hold. ``StaticMatMul8bitLt`` computes the same thing with a column mask
instead: the int8 part is bitsandbytes' own ops on the same quantized input, and the outlier part is
one 16-bit matmul of the input with every non-outlier column zeroed against the whole dequantized
weight (the zeroed columns add exact zeros), in autocast's dtype under autocast, as the library's. Its
backward is the library's for a frozen weight (the input's gradient through the dequantized weight).
``use_static_int8`` turns every ``bnb.nn.Linear8bitLt`` of a model into a ``StaticLinear8bitLt`` that
computes with it; tests compare it with ``MatMul8bitLt`` on the same inputs.
"""

from __future__ import annotations

import types

import bitsandbytes as bnb
import torch


class StaticMatMul8bitLt(torch.autograd.Function):
    """``MatMul8bitLt`` for a frozen int8 weight (``CB`` int8 rows, ``SCB`` their scales)."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:  # fmt: skip
        shape = A.shape
        ctx.save_for_backward(CB, SCB)
        ctx.shape, ctx.dtype = shape, A.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if A.numel() == 0:  # as the library: an empty result of the right shape
            return A.new_empty((*shape[:-1], CB.shape[0]))
        A2 = A.reshape(-1, shape[-1])
        A16 = A2.to(torch.float16)
        ops = torch.ops.bitsandbytes
        if threshold > 0.0:
            outliers = A16.abs() >= threshold
            cols = outliers.any(dim=0)
            # the library's quantization leaves outliers out of each row's scale and zeroes their columns
            CA, SCA, _ = ops.int8_vectorwise_quant.default(A16.masked_fill(outliers, 0.0), 0.0)
            CA = CA.masked_fill(cols, 0)
        else:
            CA, SCA, _ = ops.int8_vectorwise_quant.default(A16, 0.0)
        out = ops.int8_scaled_mm.default(CA, CB, SCA, SCB, bias=bias, dtype=A2.dtype)
        if threshold > 0.0:
            # bitsandbytes' outlier matmul runs in autocast's dtype under autocast (its addmm is cast), and
            # so does this one; the product is added to the int8 part, which stays in A's dtype, so the
            # result's dtype never depends on whether a batch has outliers (the library's then turns bf16)
            kind = A.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else A2.dtype
            W = ops.int8_vectorwise_dequant.default(CB, SCB).to(dtype)
            with torch.autocast(kind, enabled=False):
                sub = A2.masked_fill(~cols, 0.0).to(dtype)
                out = out.addmm(sub, W.t()) if dtype == out.dtype else out.add_(torch.mm(sub, W.t()))
        return out.reshape(*shape[:-1], CB.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        CB, SCB = ctx.saved_tensors
        needs_A, _, _, needs_bias, _ = ctx.needs_input_grad
        grad_A = grad_bias = None
        if needs_bias:  # the library's sum: over the first dimension (autograd sums the rest)
            grad_bias = grad_output.sum(0, dtype=ctx.bias_dtype)
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        if needs_A:
            W = CB.to(ctx.dtype, copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
            grad_A = torch.matmul(grad.to(ctx.dtype), W).view(ctx.shape)
        return grad_A, None, None, grad_bias, None


class StaticLinear8bitLt(bnb.nn.Linear8bitLt):
    """``bnb.nn.Linear8bitLt`` whose training matmul on CUDA is ``StaticMatMul8bitLt`` (frozen int8
    weights). Elsewhere it is the library's forward: evaluation and generation (never captured) keep
    computing only the outlier columns in 16 bits, and training on a CPU or XPU goes through another
    matmul in the library."""

    def uses_static(self, x: torch.Tensor) -> bool:
        return self.training and x.device.type == "cuda"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_static(x):
            return super().forward(x)
        self.state.is_training = self.training
        if self.weight.CB is not None:
            self.init_8bit_state()
        if self.bias is not None and self.bias.dtype != x.dtype:
            self.bias.data = self.bias.data.to(x.dtype)
        out = StaticMatMul8bitLt.apply(x, self.state.CB, self.state.SCB, self.bias, float(self.state.threshold))
        self.weight.data = self.state.CB  # as the library's forward leaves it
        return out


def static_int8_blocker(module: torch.nn.Module) -> str | None:
    """Why this 8-bit layer cannot take the static matmul, or None."""
    if module.state.has_fp16_weights:
        return "its weights are kept in 16 bits (has_fp16_weights)"
    if module.weight.requires_grad:
        return "its int8 weight trains"
    if module.weight.CB is None and module.state.CB is None:
        return "it holds no int8 weight (not quantized yet)"
    return None


def use_static_int8(model: torch.nn.Module) -> int:
    """Every ``bnb.nn.Linear8bitLt`` of ``model`` becomes a ``StaticLinear8bitLt`` (the same layer and
    weights, the matmul above); returns how many layers changed. Raises ValueError naming a layer
    that cannot."""
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, bnb.nn.Linear8bitLt) and not isinstance(m, StaticLinear8bitLt)]  # fmt: skip
    for name, m in layers:
        why = static_int8_blocker(m)
        if why:
            raise ValueError(f"{name}: no static int8 matmul: {why}")
    for _, m in layers:
        m.__class__ = StaticLinear8bitLt
        if hasattr(m, "_old_forward"):  # an accelerate hook calls the forward it wrapped
            m._old_forward = types.MethodType(StaticLinear8bitLt.forward, m)
    return len(layers)
