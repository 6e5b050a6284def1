"""PyTorch's scaled-dot-product-attention kernels on this GPU, at a trial's and a decoder's shapes.

For each kernel choice (PyTorch's default, every kernel but cuDNN's, and each kernel alone): the first
and the steady time of one attention forward + backward at the training shape (2 x 128 tokens,
SmolLM2-135M's 9 query / 3 KV heads of 64, with and without a padding mask), and the time of one
decoding call (32 rows, one new query against a cache) over 32 calls at 32 new cache lengths, then
the same 32 lengths again. A kernel that builds a plan per shape shows it in the first columns. The
first choice measured (PyTorch's default) also pays the process's first CUDA calls.

    python benchmarks/sdpa_backends.py benchmarks/results/sdpa_backends_h100.json
"""
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEV = "cuda"
H, D = 9, 64  # SmolLM2-135M: 9 query heads of 64 (its 3 KV heads are repeated before SDPA)
BACKENDS = {
    "default": None,
    "no_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
}


def timed_ms(fn, n: int = 1) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3 / n, 3)


def train_case(mask: bool):
    q, k, v = (torch.randn(2, H, 128, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    m = None
    if mask:  # causal, the second row padded after 100 tokens
        m = torch.ones(2, 1, 128, 128, dtype=torch.bool, device=DEV).tril()
        m[1, :, :, 100:] = False
        m[1, :, 100:, :] = True

    def step():
        F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None).sum().backward()

    return step


def decode_case(length: int, mask: bool):
    q = torch.randn(32, H, 1, D, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(32, H, length, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    m = torch.ones(32, 1, 1, length, dtype=torch.bool, device=DEV) if mask else None
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def measure(index: int, kernels) -> dict:
    r = {}
    ctx = (lambda: sdpa_kernel(kernels)) if kernels else contextlib.nullcontext
    for mask in (False, True):
        tag = f"mask{int(mask)}"
        try:
            with ctx():
                step = train_case(mask)
                r[f"train_{tag}_first_ms"] = timed_ms(step)
                r[f"train_{tag}_steady_ms"] = timed_ms(step, 20)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot take this case
            r[f"train_{tag}_error"] = str(e)[:120]
        try:
            with ctx():
                # cache lengths no other choice has seen, so a plan cache cannot carry over
                calls = [decode_case(100 + i + 40 * index + 200 * mask, mask) for i in range(32)]
                r[f"decode32_{tag}_ms_per_call_new_lengths"] = timed_ms(lambda: [c() for c in calls]) / 32
                r[f"decode32_{tag}_ms_per_call_again"] = timed_ms(lambda: [c() for c in calls]) / 32
        except Exception as e:  # noqa: BLE001
            r[f"decode_{tag}_error"] = str(e)[:120]
    return r


def main() -> None:
    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
           "cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
           "flash": torch.backends.cuda.flash_sdp_enabled(),
           "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}  # fmt: skip
    for i, (name, kernels) in enumerate(BACKENDS.items()):
        out[name] = measure(i, kernels)
    cols = ["train_mask0_first_ms", "train_mask0_steady_ms", "train_mask1_first_ms", "train_mask1_steady_ms",
            "decode32_mask1_ms_per_call_new_lengths", "decode32_mask1_ms_per_call_again"]  # fmt: skip
    print(f"{'kernels':<10}" + "".join(f"{c.replace('_ms', '').replace('_per_call', ''):>28}" for c in cols))
    for name in BACKENDS:
        print(f"{name:<10}" + "".join(f"{out[name].get(c, 'n/a'):>28}" for c in cols))
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
