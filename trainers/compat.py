"""CPU work-arounds for the two library traps measured in GUIDE §4, each in one named function.

Both are no-ops on a CUDA machine; on CPU (tests, CI) they make the libraries compute correctly.
"""

from __future__ import annotations

import types

import torch


def guard_galore_cuda_synchronize() -> bool:
    """galore-torch 1.0's 8-bit AdamW calls ``torch.cuda.synchronize()`` unconditionally, which
    raises ``AssertionError: Torch not compiled with CUDA enabled`` on CPU builds.

    Only when CUDA is absent, give ``galore_torch.adamw8bit`` its own view of ``torch`` whose
    ``cuda.synchronize`` does nothing (there is no device to wait for). The real ``torch`` module is
    untouched for everyone else. Returns True when the guard was installed.
    """
    if torch.cuda.is_available():
        return False
    import galore_torch.adamw8bit as adamw8bit

    if getattr(adamw8bit.torch, "_duetto_cpu_guard", False):
        return True
    cuda_view = types.SimpleNamespace(**{k: getattr(torch.cuda, k) for k in dir(torch.cuda) if not k.startswith("__")})
    cuda_view.synchronize = lambda *a, **k: None
    torch_view = types.ModuleType("torch")
    torch_view.__dict__.update(torch.__dict__)
    torch_view.cuda = cuda_view
    torch_view._duetto_cpu_guard = True
    adamw8bit.torch = torch_view
    return True


def disable_nf4_avx512bf16_repack(model: torch.nn.Module) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes' 4-bit Linear repacks its weights in place during the
    first no-grad (eval) forward, after which LoRA gradients through it are silently wrong
    (warning ``gemv_4bit: an autograd kernel was not registered``). Turning the fast path off on
    every ``Linear4bit`` keeps the weights in the layout autograd understands.

    Returns the number of layers changed (0 on GPU or when the model has no 4-bit layers).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
