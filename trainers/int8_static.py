"""LLM.int8 matmuls of a frozen bitsandbytes 8-bit base with static shapes, so a QLoRA int8 step can be
captured as a CUDA graph.

bitsandbytes' ``MatMul8bitLt`` splits each input into outlier columns (any value at or above the
threshold, 6.0 by default) and the rest: the rest goes through an int8 matmul, the outlier columns
through a 16-bit matmul with the matching columns of the dequantized weight. It finds the outlier
columns with ``argwhere``, whose result size the host must read: a wait for the GPU in every matmul,
and a shape no CUDA graph can hold. ``StaticMatMul8bitLt`` computes the same thing with a column mask
instead: the int8 part is bitsandbytes' own ops on the same quantized input, and the outlier part is
one 16-bit matmul of the input with every non-outlier column zeroed against the whole dequantized
weight (the zeroed columns add exact zeros). Its backward is the library's for a frozen weight
(the input's gradient through the dequantized weight). ``use_static_int8`` puts it under every
``bnb.nn.Linear8bitLt`` of a model; tests compare it with ``MatMul8bitLt`` on the same inputs.
"""

from __future__ import annotations

import types

import torch


class StaticMatMul8bitLt(torch.autograd.Function):
    """``MatMul8bitLt`` for a frozen int8 weight (``CB`` int8 rows, ``SCB`` their scales)."""

    @staticmethod
    def forward(ctx, A: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:  # fmt: skip
        shape = A.shape
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
            W = ops.int8_vectorwise_dequant.default(CB, SCB).to(A2.dtype)
            out = out.addmm(A2.masked_fill(~cols, 0.0), W.t())
        ctx.save_for_backward(CB, SCB)
        ctx.shape, ctx.dtype = shape, A2.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.reshape(*shape[:-1], CB.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        CB, SCB = ctx.saved_tensors
        needs_A, _, _, needs_bias, _ = ctx.needs_input_grad
        grad_A = grad_bias = None
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        if needs_bias:
            grad_bias = grad.sum(0, dtype=ctx.bias_dtype)
        if needs_A:
            W = CB.to(ctx.dtype, copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
            grad_A = torch.matmul(grad.to(ctx.dtype), W).view(ctx.shape)
        return grad_A, None, None, grad_bias, None


def _static_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``bnb.nn.Linear8bitLt.forward`` with the matmul above (frozen int8 weights only)."""
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
    """Every ``bnb.nn.Linear8bitLt`` of ``model`` computes its matmul with ``StaticMatMul8bitLt``;
    returns how many layers changed. Raises ValueError naming a layer that cannot."""
    import bitsandbytes as bnb

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    for name, m in layers:
        why = static_int8_blocker(m)
        if why:
            raise ValueError(f"{name}: no static int8 matmul: {why}")
    for _, m in layers:
        m.forward = types.MethodType(_static_forward, m)
    return len(layers)
