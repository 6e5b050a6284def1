"""Finding and loading what trials saved: trial dirs, model dirs, adapters, sweeps."""

from __future__ import annotations

import json

import pytest
import torch

from duetto.config import ConfigError
from duetto.serve.loading import (
    inspect_saved,
    load_for_inference,
    merge_adapter,
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


def test_a_quantized_base_is_dequantized_before_the_adapter_is_merged(qlora_trial, bits=4):
    """adapter=merge over a 4/8-bit base computes what the PEFT adapter on that quantized base computes
    (the weights it trained against), as plain Linear layers, with no quantizer left on the model."""
    spec = inspect_saved(qlora_trial)
    kept, tok = load_for_inference(spec, "cpu", dtype="float32", quantize=str(bits), adapter="keep")
    merged, _ = load_for_inference(spec, "cpu", dtype="float32", quantize=str(bits), adapter="merge")
    plain, _ = load_for_inference(spec, "cpu", dtype="float32", quantize="none")  # the original weights + adapter
    ids = torch.tensor([tok("What is the capital of Peru?")["input_ids"]])
    with torch.no_grad():
        want, got, other = (m(input_ids=ids).logits for m in (kept, merged, plain))
    # bitsandbytes' own 4/8-bit matmul rounds a little differently from the dequantized weights (under
    # 1% of the logits here); merging into the original weights instead is an order of magnitude off
    off, off_plain = (got - want).abs().max().item(), (other - want).abs().max().item()
    assert off < 0.02 * want.abs().max().item() and off < off_plain / 5, (off, off_plain)
    assert all(type(m) is torch.nn.Linear for m in merged.modules() if isinstance(m, torch.nn.Linear))
    assert getattr(merged, "hf_quantizer", None) is None and not getattr(merged, "is_quantized", False)


def test_an_int8_base_merges_its_dequantized_weights(qlora_trial):
    """LLM.int8 also rounds activations, so its logits are no reference: the merged weight itself is
    the int8 weight dequantized (int8 x row scale / 127) plus the LoRA delta."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = inspect_saved(qlora_trial)
    merged, _ = load_for_inference(spec, "cpu", dtype="float32", quantize="8", adapter="merge")
    kept, _ = load_for_inference(spec, "cpu", dtype="float32", quantize="8", adapter="keep")
    layer = kept.base_model.model.model.layers[0].self_attn.q_proj
    w8 = layer.base_layer.weight
    scb = w8.SCB if getattr(w8, "SCB", None) is not None else layer.base_layer.state.SCB
    want = w8.data.float() * scb.float().view(-1, 1) / 127 + layer.get_delta_weight("default")
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(got, want, atol=1e-6)
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec.base), spec.path).merge_and_unload()
    assert not torch.allclose(original.model.layers[0].self_attn.q_proj.weight, want, atol=1e-4)


def test_merge_choice():
    assert merge_adapter("auto", "cpu", None, 10**12)  # un-quantized: merging is exact
    assert not merge_adapter("auto", "cpu", 4, 1)  # quantized on CPU: kept as trained
    assert merge_adapter("merge", "cpu", 4, 10**12) and not merge_adapter("keep", "cuda", None, 1)
    with pytest.raises(ConfigError, match="adapter: must be auto, merge or keep"):
        merge_adapter("yes", "cpu", None, 1)


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


def test_a_trial_is_prompted_at_its_training_length(galore_trial, tiny_gemma_dir, load_lm):
    """load_lm: a trial cuts prompts (and encodes scored pairs) at its config.yaml max_seq_len; a plain
    model dir at its context window; the context window stays the model's (capped)."""
    from duetto.serve.loading import load_lm as load

    trained = inspect_saved(galore_trial).max_seq_len
    lm = load_lm(galore_trial)
    assert (lm.max_seq_len, lm.context) == (trained, 1024)
    assert (load(str(galore_trial), device="cpu", context_cap=16).max_seq_len) == 16  # never above the context
    plain = load_lm(tiny_gemma_dir)
    assert plain.max_seq_len == plain.context == 1024


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


def _pickle_only(src, out, weights: str, state_dict) -> str:
    """A copy of the model/adapter dir ``src`` whose weights are a pickle (``weights``), not safetensors."""
    import shutil

    shutil.copytree(src, out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    torch.save(state_dict, out / weights)
    return str(out)


@pytest.fixture
def pickle_model(tiny_gemma_dir, tmp_path) -> str:
    from transformers import AutoModelForCausalLM

    return _pickle_only(tiny_gemma_dir, tmp_path / "pickle-model", "pytorch_model.bin",
                        AutoModelForCausalLM.from_pretrained(tiny_gemma_dir).state_dict())  # fmt: skip


@pytest.fixture
def pickle_adapter(qlora_trial, tmp_path) -> str:
    from safetensors.torch import load_file

    weights = load_file(qlora_trial / "model" / "adapter_model.safetensors")
    return _pickle_only(qlora_trial / "model", tmp_path / "pickle-adapter", "adapter_model.bin", weights)


@pytest.mark.parametrize("which", ["pickle_model", "pickle_adapter"])
def test_pickle_weights_are_refused_unless_allowed(which, request):
    from duetto.serve.loading import require_safe_weights

    folder = request.getfixturevalue(which)
    spec = inspect_saved(folder)
    with pytest.raises(ConfigError, match=f"{folder}: .*pickle.*allow_pickle_weights") as e:
        require_safe_weights(spec)
    assert "safetensors" in str(e.value)
    with pytest.raises(ConfigError, match=folder):  # loading checks too (a Serve config file's replicas)
        load_for_inference(spec, "cpu")
    require_safe_weights(spec, allow_pickle=True)  # the trusted-checkpoint opt-in loads them
    model, _ = load_for_inference(spec, "cpu", allow_pickle=True)
    assert not model.training


def test_an_adapter_over_a_pickle_only_base_is_refused(qlora_trial, pickle_model, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(qlora_trial / "model", adapter)
    cfg_file = adapter / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": pickle_model}))
    with pytest.raises(ConfigError, match=f"{pickle_model}: .*pickle"):
        load_for_inference(inspect_saved(adapter), "cpu")


def test_serve_refuses_pickle_weights_before_ray_starts(pickle_model, galore_trial):
    from duetto.serve.app import resolve_sources
    from duetto.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=f"generator: {pickle_model}: .*allow_pickle_weights"):
        resolve_sources(ServeConfig(generator=pickle_model, reranker=str(galore_trial)))
    resolve_sources(ServeConfig(generator=pickle_model, reranker=str(galore_trial), allow_pickle_weights=True))


def test_saved_trials_are_safetensors(qlora_trial, galore_trial, load_lm):
    """What `duetto train` saves loads under the default (no pickle): the report's load_lm works on it."""
    from duetto.serve.loading import require_safe_weights

    for trial in (qlora_trial, galore_trial):
        require_safe_weights(inspect_saved(trial))
        assert load_lm(trial).model is not None
