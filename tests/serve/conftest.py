"""Trial dirs shaped like what `duetto train` saves, built from the session's tiny models."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml


#: The trials' training max_seq_len: below the served context (96 tokens in test_app), so that a
#: prompt can be longer than what the model was trained on and still fit, and is cut, not refused.
TRIAL_MAX_SEQ_LEN = 40


def write_trial(out: Path, method: str, base: str, template: str, bits: int | None = None) -> None:
    cfg = {"method": method, "model": str(base), "template": template, "max_seq_len": TRIAL_MAX_SEQ_LEN}
    if bits is not None:
        cfg["qlora"] = {"bits": bits}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    (out / "metrics.json").write_text(json.dumps({"eval_loss": 1.0, "model_dir": str(out / "model")}))


@pytest.fixture(scope="session")
def qlora_trial(tiny_gemma_dir, tmp_path_factory) -> Path:
    """A QLoRA trial: model/ is a PEFT adapter over the tiny Gemma, with non-zero LoRA weights so
    that applying it visibly changes the model (a freshly initialised LoRA is a no-op), scaled down
    so that its answers still depend on the prompt (at full scale every prompt gives one answer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("qlora-trial")
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    torch.manual_seed(1)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    model.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(tiny_gemma_dir).save_pretrained(out / "model")
    write_trial(out, "qlora", str(tiny_gemma_dir), "study", bits=8)
    return out


@pytest.fixture(scope="session")
def galore_trial(tiny_smollm_dir, tmp_path_factory) -> Path:
    """A GaLore trial: model/ is a full model (the tiny SmolLM2-shaped Llama), chat template."""
    out = tmp_path_factory.mktemp("galore-trial")
    shutil.copytree(tiny_smollm_dir, out / "model")
    write_trial(out, "galore", str(tiny_smollm_dir), "chat")
    return out


@pytest.fixture(scope="session")
def load_lm():
    """``load_lm(source, template="")`` -> a LoadedModel on CPU, loaded the way a deployment loads it."""
    return _load_lm


def _load_lm(source, template: str = ""):
    from duetto.serve.loading import load_lm

    return load_lm(str(source), template, device="cpu")


@pytest.fixture(scope="session")
def serve_app():
    """``with serve_app(cfg) as url:`` the Serve app of a ServeConfig, on a private Ray (2 CPUs, loopback:
    never a `ray start` head another process left on this machine), shut down afterwards."""
    return _serve_app


@contextlib.contextmanager
def _serve_app(cfg):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from duetto.ray_connect import init_local
    from duetto.serve.app import start

    init_local(num_cpus=2, include_dashboard=False)
    try:
        yield start(cfg)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def burst():
    """``burst(url, headers=None)``: four /v1/generate requests at once against a running app, each
    answered 200; returns each answer's ``batch`` (how many requests each model's call merged)."""
    return _burst


def _burst(url: str, headers: dict | None = None) -> list[dict]:
    import asyncio

    import httpx

    async def send():
        async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=120) as c:
            return await asyncio.gather(*[
                c.post("/v1/generate", json={"instruction": f"Name {n} colors.", "k": 2, "max_new_tokens": 4}) for n in range(4)
            ])  # fmt: skip

    rs = asyncio.run(send())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    return [r.json()["batch"] for r in rs]
