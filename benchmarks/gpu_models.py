"""Model folders for GPU benchmarks: the study's google/gemma-3-1b-it architecture with random
weights (no hub on the device) and SmolLM2 converted from a carried GGUF."""

from __future__ import annotations

from pathlib import Path


def gemma3_1b_config():
    """google/gemma-3-1b-it's architecture (its config.json's values)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
    )


def gemma3_1b_random(out: str | Path, seed: int = 0) -> Path:
    """gemma-3-1b-it's shape with random bf16 weights, and the tiny Gemma tokenizer (ids < vocab)."""
    import torch
    from transformers import AutoModelForCausalLM

    from duetto.models import load_tokenizer
    from duetto.tiny_model import build_tiny

    out = Path(out)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    config = gemma3_1b_config()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tiny = build_tiny(out.parent / "tiny-gemma-tokenizer", style="gemma")
    tok = load_tokenizer(str(tiny))
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def smollm2_random(config_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """SmolLM2-135M-Instruct's architecture and tokenizer (a folder of its config and tokenizer files)
    with random bf16 weights: speed work needs no trained weights."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(config_dir).iterdir():
        shutil.copy(f, out / f.name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out
