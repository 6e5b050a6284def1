"""Finding and loading what trials saved: trial dirs, model dirs, adapters, sweeps."""

from __future__ import annotations

import json

import pytest
import torch

from duetto.config import ConfigError
from duetto.serve.loading import (
    inspect_saved,
    load_for_inference,
    models_from_sweep,
    prompting_info,
    quantize_bits,
)


def test_inspect_trial_dirs(qlora_trial, galore_trial, tiny_gemma_dir):
    q = inspect_saved(qlora_trial)
    assert q.adapter and q.base == str(tiny_gemma_dir) and q.method == "qlora"
    assert q.template == "study" and q.bits == 8 and q.path == str(qlora_trial / "model")
    assert inspect_saved(qlora_trial / "model") == inspect_saved(str(qlora_trial / "model"))  # model/ finds its trial
    assert inspect_saved(qlora_trial / "model").template == "study"
    g = inspect_saved(galore_trial)
    assert not g.adapter and g.method == "galore" and g.template == "chat"
    plain = inspect_saved(tiny_gemma_dir)
    assert not plain.adapter and plain.method is None and plain.template is None
    hub = inspect_saved("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.path == "HuggingFaceTB/SmolLM2-135M-Instruct" and not hub.adapter


def test_inspect_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        inspect_saved(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither config.json"):
        inspect_saved(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="adapter_config.json: not valid JSON"):
        inspect_saved(tmp_path / "bad")


def test_adapter_is_applied_and_merged_exactly(qlora_trial, tiny_gemma_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = inspect_saved(qlora_trial)
    merged, tok = load_for_inference(spec, "cpu", quantize="auto")  # CPU + auto: fp32 base, adapter merged
    assert not isinstance(merged, PeftModel) and not merged.training
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    ids = torch.tensor([tok("What is the capital of Peru?")["input_ids"]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma_dir), spec.path)(
            input_ids=ids
        ).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, unmerged, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter really changes the model


def test_quantize_choice(qlora_trial, galore_trial):
    q, g = inspect_saved(qlora_trial), inspect_saved(galore_trial)
    assert quantize_bits(q, "cuda", "auto") == 8  # as trained
    assert quantize_bits(q, "cpu", "auto") is None  # int8 on CPU is slow: fp32 base instead
    assert quantize_bits(q, "cpu", "4") == 4 and quantize_bits(q, "cuda", "none") is None
    assert quantize_bits(g, "cuda", "8") is None  # a full model is never quantized


def test_prompting_info(qlora_trial, galore_trial):
    q = prompting_info(str(qlora_trial))
    assert q.template == "study" and q.context == 1024
    assert prompting_info(str(qlora_trial), "chat", context_cap=64).template == "chat"
    assert prompting_info(str(qlora_trial), "", context_cap=64).context == 64
    assert prompting_info(str(galore_trial)).template == "chat"


def test_models_from_sweep(tmp_path, qlora_trial, galore_trial):
    best = {"galore": {"trial_dir": str(galore_trial), "model_dir": str(galore_trial / "model")},
            "qlora": {"trial_dir": str(qlora_trial), "model_dir": str(qlora_trial / "model")}}  # fmt: skip
    (tmp_path / "best.json").write_text(json.dumps(best))
    assert models_from_sweep(tmp_path) == (str(qlora_trial), str(galore_trial))
    (tmp_path / "best.json").write_text(json.dumps({"galore": best["galore"]}))
    with pytest.raises(ConfigError, match="no qlora entry"):
        models_from_sweep(tmp_path)
    with pytest.raises(ConfigError, match="best.json: no such file"):
        models_from_sweep(tmp_path / "nothing")
