"""Find and load what `duetto train` / `duetto sweep` saved, for inference.

A trial's output dir holds ``model/`` (a full HF model for GaLore, a PEFT adapter for QLoRA),
``config.yaml`` (the resolved trial config) and ``metrics.json``. ``inspect_saved`` accepts a trial
dir, its ``model/`` dir, a plain HF model dir or a hub id, and says what it is without loading
weights; ``load_for_inference`` then loads it on a device. A sweep dir names its best trials in
``best.json`` ({"galore": {"trial_dir", "model_dir"}, "qlora": {...}}).

Weights load from safetensors only (what `duetto train` saves): unpickling a ``*.bin`` checkpoint can
run arbitrary code, so a pickle-only folder is refused unless ``allow_pickle`` says it is trusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duetto.config import ConfigError, read_yaml


@dataclass
class SavedModel:
    source: str
    """What the user named."""
    path: str
    """Dir (or hub id) to load: the adapter dir for a PEFT adapter, else the full model."""
    adapter: bool = False
    """True for a PEFT adapter (QLoRA): ``base`` holds the base model."""
    base: str | None = None
    """Base model dir or id of an adapter."""
    method: str | None = None
    """galore | qlora when it came from a trial."""
    template: str | None = None
    """The trial's prompt template (study | chat); None when unknown."""
    max_seq_len: int | None = None
    """The trial's training sequence length: inference cuts prompts (and encodes scored pairs) to it,
    as the trial's own evaluation does; the context window still bounds prompt + answer."""
    bits: int | None = None
    """qlora.bits the base was trained under (8 or 4)."""
    trial_dir: str | None = None

    @property
    def config_path(self) -> str:
        """Where the architecture config lives (the base for an adapter)."""
        return self.base if self.adapter and self.base else self.path

    @property
    def tokenizer_path(self) -> str:
        # Trials save the tokenizer next to the adapter; an adapter dir without one uses its base.
        p = Path(self.path)
        if self.adapter and not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return self.base or self.path
        return self.path


def inspect_saved(source: str | Path) -> SavedModel:
    """Describe a trial dir, a model/ dir, an HF model dir or a hub id (reads only small files)."""
    src = str(source)
    p = Path(src).expanduser()
    if not p.exists():
        if src.startswith((".", "/", "~")) or src.count("/") > 1:
            raise ConfigError(f"{src}: no such directory (expected a trial dir, a model/ dir or a hub id)")
        return SavedModel(source=src, path=src)  # a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct
    if not p.is_dir():
        raise ConfigError(f"{src}: not a directory (expected a trial dir, a model/ dir or an HF model dir)")
    trial_dir: Path | None = None
    model_dir = p
    if (p / "model").is_dir() and (p / "config.yaml").is_file():
        trial_dir, model_dir = p, p / "model"
    elif p.name == "model" and (p.parent / "config.yaml").is_file():
        trial_dir = p.parent
    trial_cfg = read_yaml(trial_dir / "config.yaml") if trial_dir else {}
    adapter_cfg_file = model_dir / "adapter_config.json"
    spec = SavedModel(source=src, path=str(model_dir), trial_dir=str(trial_dir) if trial_dir else None)
    if trial_cfg:
        spec.method = trial_cfg.get("method")
        spec.template = trial_cfg.get("template")
        spec.max_seq_len = trial_cfg.get("max_seq_len")
        bits = (trial_cfg.get("qlora") or {}).get("bits")
        spec.bits = int(bits) if bits is not None else None
    if adapter_cfg_file.is_file():
        try:
            adapter_cfg = json.loads(adapter_cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{adapter_cfg_file}: not valid JSON: {e}") from None
        base = adapter_cfg.get("base_model_name_or_path") or trial_cfg.get("model")
        if not base:
            raise ConfigError(
                f"{adapter_cfg_file}: base_model_name_or_path is empty and no trial config names the base"
            )
        spec.adapter, spec.base = True, str(base)
    elif not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir}: neither config.json (a full model) nor adapter_config.json (a PEFT adapter)")
    return spec


#: Weight files of a full model and of a PEFT adapter: (safetensors, pickle) glob patterns.
_WEIGHT_FILES = {
    False: ("model*.safetensors*", "pytorch_model*.bin*"),
    True: ("adapter_model.safetensors", "adapter_model.bin"),
}


def require_safe_weights(spec: SavedModel, allow_pickle: bool = False) -> None:
    """Refuse a local model dir, adapter dir or adapter base whose weights are pickles only, unless
    ``allow_pickle``. Hub ids are left to ``from_pretrained(use_safetensors=True)``."""
    if allow_pickle:
        return
    dirs = [(Path(spec.path), spec.adapter)]
    if spec.adapter and spec.base:
        dirs.append((Path(spec.base).expanduser(), False))
    for folder, adapter in dirs:
        safe, pickled = _WEIGHT_FILES[adapter]
        found = sorted(f.name for f in folder.glob(pickled)) if folder.is_dir() else []
        if found and not any(folder.glob(safe)):
            raise ConfigError(
                f"{folder}: weights are pickle files only ({', '.join(found)}), no safetensors; unpickling can run "
                "arbitrary code. Re-save the model with save_pretrained (it writes safetensors), or set "
                "allow_pickle_weights=true for a checkpoint you trust"
            )


def models_from_sweep(sweep_dir: str | Path) -> tuple[str, str]:
    """(generator, reranker) from a sweep's best.json: best QLoRA trial generates, best GaLore trial reranks."""
    best_file = Path(sweep_dir) / "best.json"
    if not best_file.is_file():
        raise ConfigError(f"{best_file}: no such file (is {sweep_dir} a finished `duetto sweep` dir?)")
    try:
        best = json.loads(best_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{best_file}: not valid JSON: {e}") from None
    picked = []
    for method in ("qlora", "galore"):
        entry = best.get(method) if isinstance(best, dict) else None
        if not isinstance(entry, dict) or not (entry.get("trial_dir") or entry.get("model_dir")):
            raise ConfigError(
                f"{best_file}: no {method} entry with trial_dir/model_dir (the sweep found no finished {method} trial)"
            )
        picked.append(str(entry.get("trial_dir") or entry.get("model_dir")))
    return picked[0], picked[1]


def pick_device(has_gpu: bool) -> str:
    """A replica that Ray gave a GPU (share) runs on CUDA; one that got none stays on CPU."""
    import torch

    if has_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("this replica was assigned a GPU but torch sees no CUDA device")
        return "cuda"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def quantize_bits(spec: SavedModel, device: str, quantize: str) -> int | None:
    """Bits for an adapter's base: auto = as trained on GPU, none on CPU (bnb int8 on CPU is slow)."""
    if not spec.adapter or quantize == "none":
        return None
    if quantize == "auto":
        return (spec.bits or 8) if device.startswith("cuda") else None
    return int(quantize)


def _model_name_to_path(name: str) -> str:
    # A trial config may name its base by a `duetto model fetch` name (e.g. "tiny"); map it when it is one.
    if Path(name).expanduser().exists():
        return name
    try:
        from duetto.models import resolve_model

        return str(resolve_model(name))
    except Exception:  # not a fetch name: leave it to from_pretrained (a hub id), which names it if wrong
        return name


def merge_adapter(setting: str, device: str, bits: int | None, weight_bytes: int) -> bool:
    """Whether an adapter is merged into its base: merge / keep as set; auto merges un-quantized bases
    (exact, and one matmul per layer instead of two) and, on GPU, quantized ones whose merged weights
    (``weight_bytes``) fit in DEQUANTIZE_MEMORY_SHARE of the free memory: a merged model decodes on plain
    bf16 matmuls, compiles and replays as CUDA graphs, where bitsandbytes' 4/8-bit kernels do not."""
    if setting not in ("auto", "merge", "keep"):
        raise ConfigError(f"adapter: must be auto, merge or keep, got {setting!r}")
    if setting != "auto":
        return setting == "merge"
    if bits is None:
        return True
    if not device.startswith("cuda"):
        return False
    from duetto.models import dequantized_fits

    return dequantized_fits(weight_bytes, device)


def load_for_inference(
    spec: SavedModel, device: str = "cpu", dtype: str = "auto", quantize: str = "auto", tokenizer: Any = None,
    allow_pickle: bool = False, adapter: str = "auto",
):  # fmt: skip
    """(model, tokenizer) in eval mode on ``device``. A PEFT adapter's base loads at ``quantize`` bits
    (quantize_bits); ``adapter`` (merge_adapter) then folds the adapter into it, after dequantizing a
    quantized base, or keeps it as a PEFT model on the quantized base. Weights come from safetensors
    only unless ``allow_pickle`` (see require_safe_weights)."""
    from transformers import AutoModelForCausalLM

    from duetto.models import dequantize_bnb, load_tokenizer, use_attention_kernels_without_plans
    from duetto.tokens import ensure_pad_token

    require_safe_weights(spec, allow_pickle)
    use_attention_kernels_without_plans(device)
    torch_dtype = resolve_dtype(dtype, device)
    # True: from_pretrained fails rather than fall back to a pickle (None = its default, which may)
    safetensors = None if allow_pickle else True
    if tokenizer is None:
        tokenizer = load_tokenizer(_model_name_to_path(spec.tokenizer_path))
    ensure_pad_token(tokenizer)
    if spec.adapter:
        from peft import PeftModel

        bits = quantize_bits(spec, device, quantize)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": safetensors}
        if bits is not None:
            from transformers import BitsAndBytesConfig

            nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                   "bnb_4bit_compute_dtype": torch_dtype}  # fmt: skip
            kwargs["quantization_config"] = BitsAndBytesConfig(**({"load_in_8bit": True} if bits == 8 else nf4))
            kwargs["device_map"] = {"": device}
        base = AutoModelForCausalLM.from_pretrained(_model_name_to_path(spec.base or ""), **kwargs)
        merged_bytes = base.num_parameters() * torch_dtype.itemsize
        merge = merge_adapter(adapter, device, bits, merged_bytes)
        if merge and bits is not None:
            base = dequantize_bnb(base, torch_dtype)
        model = PeftModel.from_pretrained(base, spec.path)
        if merge:
            model = model.merge_and_unload()
            model.to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            _model_name_to_path(spec.path), dtype=torch_dtype, use_safetensors=safetensors
        ).to(device)
    model.eval()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def context_length(spec: SavedModel) -> int:
    """The model's context window in tokens, from its config (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(_model_name_to_path(spec.config_path))
    text_cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(text_cfg, "max_position_embeddings", None)
    if not n:
        raise ConfigError(f"{spec.config_path}: config has no max_position_embeddings; set limits.max_context_tokens")
    return int(n)


@dataclass
class PromptingInfo:
    """How to prompt a served model and how much text it takes, known without loading its weights."""

    spec: SavedModel
    tokenizer: Any
    template: str
    context: int


def prompting_info(source: str, template_override: str = "", context_cap: int = 0) -> PromptingInfo:
    """Resolve a model's tokenizer, template and context window; the deployments and the ingress both
    call this, so the ingress counts prompt tokens exactly as the model will see them."""
    from duetto.models import load_tokenizer

    spec = inspect_saved(source)
    tokenizer = load_tokenizer(_model_name_to_path(spec.tokenizer_path))
    context = min(context_length(spec), context_cap) if context_cap > 0 else context_length(spec)
    # the override, else the template the model was trained with, else chat when the tokenizer has one
    template = template_override or str(spec.template or "")
    template = template or ("chat" if getattr(tokenizer, "chat_template", None) else "study")
    return PromptingInfo(spec, tokenizer, template, context)


def load_lm(source: str, template: str = "", *, device: str = "cpu", dtype: str = "auto", quantize: str = "auto",
            context_cap: int = 0, allow_pickle: bool = False, adapter: str = "auto"):  # fmt: skip
    """Everything generation and scoring need for one model (a ``duetto.trainers.inference.LoadedModel``):
    the deployments, the benchmark and the report load models through this one function."""
    from duetto.tokens import stop_token_ids
    from duetto.trainers.inference import LoadedModel

    info = prompting_info(source, template, context_cap)
    model, tokenizer = load_for_inference(info.spec, device, dtype, quantize, info.tokenizer, allow_pickle, adapter)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        template=info.template,
        stop_ids=stop_token_ids(tokenizer, model.config),
        max_seq_len=min(int(info.spec.max_seq_len or info.context), info.context),
        context=info.context,
        name=str(source),
    )
