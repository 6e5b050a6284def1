"""Library work-arounds, each in one named function: two CPU traps of galore-torch and bitsandbytes
(no-ops on a CUDA machine; on CPU they make the libraries compute correctly), the learning-rate
schedule of the HF Trainer's layer-wise GaLore, the checkpointing keywords and switch of whichever
transformers 5.x is installed, the filter of warnings known to be harmless for a trial, and
bitsandbytes imported without building a compiler it may never use.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import types
import warnings

import torch


def checkpointing_off(model: torch.nn.Module) -> None:
    """Turn a transformers model's activation checkpointing off, by the method name this transformers 5.x
    has: newer releases name it ``activation_checkpointing_disable`` and warn on the older
    ``gradient_checkpointing_disable``, which older 5.x releases (the GPU image's 5.17) still need."""
    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    off()


def checkpointing_args(enabled: bool) -> dict:
    """TrainingArguments' activation-checkpointing keywords: newer transformers 5 releases name them
    ``activation_checkpointing*`` and warn on ``gradient_checkpointing*``, which older 5.x releases
    (the GPU image's 5.17) still need."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def layerwise_schedule_callback():
    """A Trainer callback that gives layer-wise GaLore its learning-rate schedule.

    With ``optim="galore_adamw_8bit_layerwise"`` the HF Trainer steps one library optimizer per weight
    inside backward, and its scheduler drives only the placeholder optimizer it wraps (accelerate's
    wrapper hides the placeholder from ``get_scheduler``'s layer-wise branch): the per-weight optimizers
    keep the initial learning rate for the whole run, with no warm-up or decay, while the logs show the
    schedule. Before each step this callback sets every per-weight optimizer's rate to the scheduler's
    rate for that step, as a single optimizer under the same scheduler would have. Where the optimizer
    has no per-weight optimizers (the fused GaLore optimizer of the GPU fast path) it does nothing."""
    from transformers import TrainerCallback

    class LayerwiseSchedule(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)
            per_weight = getattr(inner, "optimizer_dict", None)
            if not per_weight or lr_scheduler is None:
                return
            lr = lr_scheduler.get_last_lr()[0]
            for opt in per_weight.values():
                for group in opt.param_groups:
                    group["lr"] = lr

    return LayerwiseSchedule()


def guard_galore_cuda_synchronize() -> bool:
    """galore-torch 1.0's 8-bit AdamW calls ``torch.cuda.synchronize()`` unconditionally, which raises
    ``Torch not compiled with CUDA enabled`` on CPU builds. Without CUDA, ``galore_torch.adamw8bit`` gets
    its own view of ``torch`` whose ``cuda.synchronize`` does nothing; the real module is untouched.
    Returns True when the guard is installed."""
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
    """On CPUs with AVX512-BF16, bitsandbytes' 4-bit Linear repacks its weights in place during the first
    no-grad (eval) forward, after which LoRA gradients through it are silently wrong (warning
    ``gemv_4bit: an autograd kernel was not registered``). Turning that fast path off on every
    ``Linear4bit`` keeps the layout autograd understands. Returns the number of layers changed."""
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


#: Messages a trial is known to print needlessly: (source, message regex). A source is a logger name,
#: a warning category, or "ray-log" (a line Ray forwards from one of its own actors to the driver).
KNOWN_HARMLESS: list[tuple[str | type[Warning], str]] = [
    # bitsandbytes looks for an optional `kernels` package on AVX512-BF16 CPUs, then uses its own kernel.
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
    # GaLore's target patterns (self_attn, mlp) also match those blocks' non-Linear children, once per
    # layer; their Linear weights get GaLore, the rest plain 8-bit AdamW, which is the intent.
    ("transformers.trainer_optimizer", r" matched but ignored\. OptimizerNames\.GALORE_\w+ only supports linear layers\.$"),
    # PEFT's prepare_model_for_kbit_training still calls transformers' pre-v5 names.
    (FutureWarning, r"^`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated and will be removed in v6"),
    # Ray Train's controller starts its own PreemptionWatcher actor this way; nothing for a user to do.
    ("ray-log", r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store"),
]  # fmt: skip


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_warnings() -> None:
    """Drop exactly the ``KNOWN_HARMLESS`` messages, each from its own source only; idempotent.

    Call it before the libraries load (bitsandbytes warns while it is imported). The Ray lines are
    skipped by the driver's log printer (RAY_DEDUP_LOGS_SKIP_REGEX, read when ray is imported; set on
    an already imported Ray's printers too)."""
    ray_lines = []
    for source, pattern in KNOWN_HARMLESS:
        if source == "ray-log":
            ray_lines.append(pattern)
        elif isinstance(source, str):
            logger = logging.getLogger(source)
            if not any(isinstance(f, _DropMessages) and f.pattern.pattern == pattern for f in logger.filters):
                logger.addFilter(_DropMessages(pattern))
        else:
            warnings.filterwarnings("ignore", message=pattern.lstrip("^"), category=source)
    skip = "|".join(ray_lines)
    current = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if current and skip not in current:
        skip = f"{current}|{skip}"
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = skip
    ray_logging = sys.modules.get("ray._private.ray_logging")
    if ray_logging is not None:
        for printer in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
            printer.skip_re = re.compile(skip)


def import_bitsandbytes() -> types.ModuleType | None:
    """Import bitsandbytes (None when it is not installed) with the ``torch.compile`` calls it makes while
    it is imported deferred to each compiled function's first call.

    bitsandbytes wraps four fallback kernels (blockwise and 4-bit dequantization, 32-bit optimizer steps,
    for devices without kernels of their own) in ``torch.compile`` at import. Setting up the compiler
    imports TorchInductor: about 3 of a trial's ~12 s of set-up in a py-spy profile of `duetto train` on
    an H100 host, for kernels a CUDA trial never calls. ``torch.compile`` compiles a function at its
    first call anyway; here it is also set up then, so what runs, and where a compile failure falls back
    to the plain function (bitsandbytes' own wrapper catches it), is unchanged. Call it before anything
    imports transformers' ``Trainer`` or PEFT (they import bitsandbytes)."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    real = torch.compile

    def deferred(fn=None, **kwargs):
        if fn is None:  # used as @torch.compile(...)
            return lambda f: deferred(f, **kwargs)
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(fn, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = deferred
    try:
        import bitsandbytes
    except ImportError:
        return None
    finally:
        torch.compile = real
    return bitsandbytes
