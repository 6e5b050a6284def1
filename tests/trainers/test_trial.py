"""Trials on the tiny Gemma-3: both methods and their variants train, evaluate, save and reload.

Most tests use Ray Train's local mode (scaling.num_workers=0: the same worker function in this
process) so they take seconds; the Ray-worker, DDP and recovery tests start a real local Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from duetto.config import ConfigError, load_config
from duetto.trainers.config import TrialConfig

METRIC_TYPES = {
    "method": str,
    "train_loss": float,
    "eval_loss": float,
    "bleu4": float,
    "rougeL": float,
    "peak_memory_bytes": int,
    "tokens_per_second": float,
    "wall_seconds": float,
    "trainable_params": int,
    "total_params": int,
    "num_train_examples": int,
    "num_eval_examples": int,
}


def _cfg(tmp_path: Path, model_dir, data_files, *overrides: str) -> TrialConfig:
    train, test = data_files
    base = [
        f"model={model_dir}",
        f"data.train={train}",
        f"data.test={test}",
        f"output_dir={tmp_path / 'trial'}",
        "max_seq_len=64",
        "batch_size=4",
        "max_steps=12",
        "learning_rate=3e-3",
        "logging_steps=2",
        "report_every_steps=6",
        "interim_eval_examples=2",
        "eval.num_examples=4",
        "eval.max_new_tokens=8",
        "eval.loss_examples=16",
        "scaling.num_workers=0",
        "qlora.r=8",
        "qlora.alpha=16",
        "galore.rank=8",
        "galore.update_proj_gap=4",
        "galore.scale=1.0",
    ]
    return load_config(TrialConfig, None, base + list(overrides))


def _run(cfg: TrialConfig) -> dict:
    from duetto.trainers.trial import run_trial

    metrics = run_trial(cfg)
    out = Path(cfg.output_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    for key, tp in METRIC_TYPES.items():
        assert key in on_disk, key
        assert isinstance(on_disk[key], tp), (key, on_disk[key])
    assert (out / "config.yaml").exists()
    assert on_disk["fast_path"] == "off (no CUDA device)"
    assert bool(on_disk["train_loss_curve"]) == (cfg.max_steps != 0)
    assert metrics["method"] == cfg.method
    return on_disk


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from duetto.ray_connect import init_local

    if not ray.is_initialized():
        init_local(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "method,extra",
    [
        ("qlora", ["qlora.bits=8", "learning_rate=2e-2", "qlora.target_modules=[all-linear]"]),
        ("qlora", ["qlora.bits=4", "learning_rate=2e-2", "qlora.target_modules=[all-linear]"]),
        ("galore", ["galore.layerwise=true"]),
        ("galore", ["galore.layerwise=false"]),
    ],
    ids=["qlora-8bit", "qlora-nf4", "galore-layerwise", "galore-ddp-capable"],
)
def test_method_trains_with_falling_loss_and_reloads(tmp_path, tiny_gemma_dir, unified_data, method, extra):
    cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, f"method={method}", *extra)
    base = _run(load_config(TrialConfig, None, [f"model={tiny_gemma_dir}", f"data.train={unified_data[0]}",
                                                f"data.test={unified_data[1]}", f"output_dir={tmp_path / 'base'}",
                                                "method=baseline", "max_steps=0", "max_seq_len=64",
                                                "eval.num_examples=4", "eval.max_new_tokens=8",
                                                "eval.loss_examples=16", "scaling.num_workers=0"]))
    m = _run(cfg)
    # Training must lower the held-out loss of the random model below the untrained baseline's. LoRA on
    # a frozen random base moves it less in 12 steps than full-parameter GaLore (measured: ~0.07 vs ~0.7).
    margin = 0.03 if method == "qlora" else 0.2
    assert m["eval_loss"] < base["eval_loss"] - margin, (base["eval_loss"], m["eval_loss"])
    assert m["trainable_params"] > 0 and m["tokens_per_second"] > 0
    if method == "qlora":
        assert m["trainable_params"] < m["total_params"] / 2
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base_model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
        reloaded = PeftModel.from_pretrained(base_model, m["model_dir"])
        assert any("lora_" in n for n, _ in reloaded.named_parameters())
    else:
        assert m["trainable_params"] == m["total_params"]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        reloaded = AutoModelForCausalLM.from_pretrained(m["model_dir"])
        AutoTokenizer.from_pretrained(m["model_dir"])
        assert reloaded.config.model_type == "gemma3_text"
    assert math.isfinite(m["bleu4"]) and 0.0 <= m["rougeL"] <= 1.0


def test_baseline_is_zero_steps_on_the_same_path(tmp_path, tiny_gemma_dir, unified_data):
    cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=baseline", "max_steps=0")
    m = _run(cfg)
    assert m["step"] == 0 and m["trainable_params"] == 0 and m["num_eval_examples"] == 4


def test_layerwise_galore_rejects_ddp_and_accumulation(tmp_path, tiny_gemma_dir, unified_data):
    with pytest.raises(ConfigError, match="layer-wise GaLore.*DDP"):
        _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=galore", "scaling.num_workers=2")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=galore", "gradient_accumulation_steps=4")
    # non-layerwise GaLore may use both
    _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=galore", "galore.layerwise=false", "scaling.num_workers=2")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("method=lora", "method"),
        ("qlora.bits=3", "qlora.bits"),
        ("batch_size=two", "batch_size"),
        ("learning_rate=-1", "learning_rate"),
        ("qlora.rank=4", "unknown key qlora.rank"),
        ("max_steps=-5", "max_steps"),
        ("method=baseline", "max_steps"),
    ],
)
def test_invalid_configs_name_the_key(tmp_path, tiny_gemma_dir, unified_data, override, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(tmp_path, tiny_gemma_dir, unified_data, override)


def test_cli_trains_through_ray_workers(tmp_path, tiny_gemma_dir, unified_data):
    """`duetto train` in a subprocess, with real Ray Train workers (local Ray started by the CLI)."""
    import os
    import subprocess
    import sys

    train, test = unified_data
    cmd = [
        sys.executable, "-m", "duetto", "train", "configs/qlora_study.yaml",
        f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}",
        f"output_dir={tmp_path / 'cli'}", "max_steps=4", "max_seq_len=64", "qlora.bits=4",
        "eval.num_examples=2", "eval.max_new_tokens=4", "eval.loss_examples=8", "interim_eval_examples=0",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "logging_steps=2",
    ]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    # one opening line first, then one plain line per logging step, no progress bars, no known-harmless noise
    assert out.splitlines()[0].startswith(f"duetto train: qlora of {tiny_gemma_dir} on 96 train rows"), out[:500]
    assert "1 Ray worker on CPU" in out.splitlines()[0] and str(tmp_path / "cli") in out.splitlines()[0]
    assert sum("duetto train: step 2/4  loss" in ln for ln in out.splitlines()) == 1
    for noise in ("it/s]", "gemm_4bit_forward", "PreemptionWatcher", "is deprecated and will be removed in v6"):
        assert noise not in out, noise
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["method"] == "qlora" and metrics["step"] == 4 and metrics["world_size"] == 1
    assert (tmp_path / "cli" / "model" / "adapter_config.json").exists()


def test_cli_rejects_bad_config_with_exit_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "duetto", "train", "configs/qlora_study.yaml", "qlora.bits=5"],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2 and "qlora.bits" in proc.stderr


@pytest.mark.slow
def test_two_worker_ddp_qlora_on_cpu(tmp_path, ray_local, tiny_gemma_dir, unified_data):
    from duetto.models import load_tokenizer
    from duetto.trainers.trial_data import EncodedDataset, read_rows

    cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=qlora", "qlora.bits=4", "scaling.num_workers=2",
               "scaling.cpus_per_worker=1", "data.limit_train=32", "max_steps=-1", "epochs=1", "interim_eval_examples=0")
    m = _run(cfg)
    assert m["world_size"] == 2 and m["step"] == 4  # 32 rows, 2 ranks x batch 4
    # every row trained once, on one rank or the other: the count is gathered over both
    ds = EncodedDataset(read_rows(unified_data[0], 32), load_tokenizer(tiny_gemma_dir), cfg.template, 64)
    assert m["trained_tokens"] == sum(len(ds[i]["input_ids"]) for i in range(len(ds)))


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(tmp_path, tiny_gemma_dir, unified_data, monkeypatch):
    """A worker dying at step 8 restarts from the step-6 checkpoint, not from step 0."""
    import ray

    from duetto.ray_connect import init_local
    from duetto.trainers.trial_reports import FAIL_AT_STEP_ENV

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "8")
    ray.shutdown()  # a Ray of another test may still be up: this one needs the env var in its workers
    init_local(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {FAIL_AT_STEP_ENV: "8"}})
    try:
        cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=qlora", "scaling.num_workers=1",
                   "max_failures=1", "interim_eval_examples=0")
        m = _run(cfg)
    finally:
        ray.shutdown()
    assert (Path(cfg.output_dir) / ".injected_failure").exists()
    assert m["step"] == 12
    assert m["resumed_from_step"] == 6  # the step-6 report's checkpoint, not a restart from 0


def test_split_validation_holds_out_the_tail():
    from duetto.trainers.trial_data import split_validation

    rows = [{"i": i} for i in range(20)]
    train, val = split_validation(rows, 0.25, "t.jsonl")
    assert [r["i"] for r in val] == [15, 16, 17, 18, 19] and len(train) == 15
    assert len(split_validation(rows, 3, "t.jsonl")[1]) == 3
    for bad in (20, 0.01):  # nothing left to train on; rounds to 0 validation rows
        with pytest.raises(ConfigError, match=r"data.val_size.*t.jsonl has 20 training rows"):
            split_validation(rows, bad, "t.jsonl")
    for bad in ("-1", "2.5"):
        with pytest.raises(ConfigError, match="data.val_size"):
            load_config(TrialConfig, None, [f"data.val_size={bad}"])


def test_validation_split_replaces_the_test_split_in_trial_evaluation(tmp_path, tiny_gemma_dir, unified_data):
    """With data.val_size the trial never reads a test row: it scores rows held out of train."""
    from duetto.data.unify import read_jsonl

    test_instructions = {r["instruction"] for r in read_jsonl(unified_data[1])}
    m = _run(_cfg(tmp_path, tiny_gemma_dir, unified_data, "method=galore", "data.limit_train=24", "data.val_size=6",
                  "max_steps=2", "report_every_steps=0", "interim_eval_examples=0"))  # fmt: skip
    assert (m["eval_split"], m["num_train_examples"], m["num_eval_examples"]) == ("validation", 18, 4)
    scored = [json.loads(line) for line in (tmp_path / "trial" / "predictions.jsonl").read_text().splitlines()]
    held_out = read_jsonl(unified_data[0])[18:24]
    assert [p["instruction"] for p in scored] == [r["instruction"] for r in held_out[:4]]
    assert not test_instructions & {p["instruction"] for p in scored}


def test_trained_tokens_and_seconds_count_training_steps_only(tmp_path, tiny_gemma_dir, unified_data):
    """Evaluation passes inside trainer.train() (here one after every step) add neither tokens nor time:
    trained tokens are exactly the training rows' non-padding tokens, once per epoch."""
    from duetto.models import load_tokenizer
    from duetto.trainers.trial_data import EncodedDataset, read_rows

    cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=galore", "galore.layerwise=true", "data.limit_train=8",
               "max_steps=-1", "epochs=2", "report_every_steps=1", "interim_eval_examples=0")  # fmt: skip
    m = _run(cfg)
    tok = load_tokenizer(tiny_gemma_dir)
    ds = EncodedDataset(read_rows(unified_data[0], 8), tok, cfg.template, cfg.max_seq_len)
    per_epoch = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    assert m["step"] == 4  # 8 rows, batch 4, 2 epochs: and 4 evaluation passes of 16 rows in between
    assert m["trained_tokens"] == 2 * per_epoch
    assert 0 < m["train_seconds"] < m["train_wall_seconds"]
    assert m["tokens_per_second"] == pytest.approx(m["trained_tokens"] / m["train_seconds"])
    phases = m["phase_seconds"]
    assert phases["train"] == m["train_wall_seconds"]
    assert min(phases.values()) >= 0 and phases["setup"] > 0 and phases["generation"] > 0
    assert sum(phases.values()) <= m["wall_seconds"]


@pytest.mark.slow  # inductor compiles on CPU: ~75 s on 2 cores
def test_compiled_trial_sees_one_batch_shape(tmp_path, tiny_gemma_dir, unified_data, monkeypatch):
    """compile=true pads every batch to max_seq_len, so torch.compile sees one shape, not one per batch."""
    from duetto.trainers.trial_data import PaddingCollator

    shapes = set()
    real = PaddingCollator.__call__

    def spy(self, features):
        batch = real(self, features)
        shapes.add(tuple(batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(PaddingCollator, "__call__", spy)
    m = _run(_cfg(tmp_path, tiny_gemma_dir, unified_data, "method=galore", "galore.layerwise=false", "max_steps=4",
                  "report_every_steps=0", "interim_eval_examples=0", "compile=true"))
    assert {s[1] for s in shapes} == {64}, shapes  # max_seq_len=64 in _cfg
    assert m["step"] == 4 and math.isfinite(m["train_loss"])


def test_auto_workers_run_in_process_unless_a_cluster_is_joined(monkeypatch):
    from duetto.trainers.config import ScalingOptions

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ScalingOptions().num_workers == "auto" and ScalingOptions().workers() == 0
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as inside `ray job submit`
    assert ScalingOptions().workers() == 1
    assert ScalingOptions(num_workers=2).workers() == 2 and ScalingOptions(num_workers=0).workers() == 0


def test_local_mode_resumes_exactly_from_its_own_checkpoint(tmp_path, tiny_gemma_dir, unified_data, monkeypatch):
    """In Ray Train's local mode (no Ray checkpoints), a trial that fails at step 8 resumes from its
    step-6 HF checkpoint under --resume and ends with the uninterrupted run's loss curve; resuming a
    finished run reports it again without training."""
    from duetto.trainers.trial import run_trial
    from duetto.trainers.trial_reports import FAIL_AT_STEP_ENV

    extra = ["method=qlora", "interim_eval_examples=0"]
    whole = run_trial(_cfg(tmp_path / "whole", tiny_gemma_dir, unified_data, *extra))
    cfg = _cfg(tmp_path / "broken", tiny_gemma_dir, unified_data, *extra)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "8")
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run_trial(cfg)
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    with pytest.raises(ConfigError, match="--resume"):
        run_trial(_cfg(tmp_path / "broken", tiny_gemma_dir, unified_data, *extra))  # not without --resume
    m = run_trial(_cfg(tmp_path / "broken", tiny_gemma_dir, unified_data, *extra), resume=True)
    assert m["resumed_from_step"] == 6 and m["step"] == 12
    curve = dict((s, loss) for s, loss in m["train_loss_curve"])
    assert set(curve) == {s for s, _ in whole["train_loss_curve"]}
    for step, loss in whole["train_loss_curve"]:
        assert curve[step] == pytest.approx(loss, rel=1e-4), step
    assert m["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)
    again = run_trial(_cfg(tmp_path / "broken", tiny_gemma_dir, unified_data, *extra), resume=True)
    assert again == json.loads((Path(cfg.output_dir) / "metrics.json").read_text())


def test_local_resume_skips_a_half_written_checkpoint(tmp_path):
    from duetto.trainers.trial import _complete_hf_checkpoints

    root = tmp_path / "hf_checkpoints"
    for name, complete in (("checkpoint-6", True), ("checkpoint-12", False), ("checkpoint-x", True), ("checkpoint-30", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text('{"global_step": 0}')
    assert [d.name for d in _complete_hf_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-30"]
    assert _complete_hf_checkpoints(tmp_path / "none") == []


def test_auto_workers_resume_a_run_of_any_worker_count(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.trainers.trial import settings_diff

    one = _cfg(tmp_path, tiny_gemma_dir, unified_data, "scaling.num_workers=1")
    auto = _cfg(tmp_path, tiny_gemma_dir, unified_data, "scaling.num_workers=auto")
    two = _cfg(tmp_path, tiny_gemma_dir, unified_data, "scaling.num_workers=2", "method=qlora")
    assert settings_diff(one, auto) == [] and settings_diff(auto, one) == []
    assert ("scaling.num_workers", 1, 2) in settings_diff(one, _cfg(tmp_path, tiny_gemma_dir, unified_data,
                                                                    "scaling.num_workers=2"))  # fmt: skip
    assert settings_diff(two, two) == []


@pytest.mark.parametrize("every, passes", [(6, 2), (5, 3)])
def test_the_last_steps_evaluation_is_not_repeated(tmp_path, tiny_gemma_dir, unified_data, monkeypatch, every, passes):
    """The Trainer evaluates at every report step and at the last one (6, 12 of 12; 5, 10, 12): the
    trial reports that last pass's loss instead of running a second pass over the same rows."""
    from transformers import Trainer

    from duetto.trainers.trial import run_trial

    seen = []
    evaluate = Trainer.evaluate

    def counted(self, *a, **k):
        out = evaluate(self, *a, **k)
        seen.append((self.state.global_step, out["eval_loss"]))
        return out

    monkeypatch.setattr(Trainer, "evaluate", counted)
    m = run_trial(_cfg(tmp_path, tiny_gemma_dir, unified_data, "method=galore", f"report_every_steps={every}",
                       "interim_eval_examples=0"))  # fmt: skip
    assert len(seen) == passes
    assert seen[-1][0] == 12 and m["eval_loss"] == seen[-1][1]


def test_local_mode_reports_interim_metrics_without_copying_checkpoints(tmp_path, tiny_gemma_dir, unified_data,
                                                                        monkeypatch):  # fmt: skip
    """Ray Train's local mode keeps no checkpoint, so interim reports carry none and no copy of the HF
    checkpoint is made (a local run resumes from its own HF checkpoints: test_local_mode_resumes_...)."""
    import ray.train

    from duetto.trainers import trial_reports
    from duetto.trainers.trial import run_trial

    reports = []
    report = ray.train.report

    def spy(metrics, checkpoint=None, **k):
        reports.append((dict(metrics), checkpoint))
        return report(metrics, checkpoint=checkpoint, **k)

    monkeypatch.setattr(ray.train, "report", spy)
    copies = []
    monkeypatch.setattr(trial_reports.shutil, "copytree", lambda *a, **k: copies.append(a))
    cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=qlora", "interim_eval_examples=0")
    run_trial(cfg)
    interim = [(m, c) for m, c in reports if not m.get("done")]
    assert [m["step"] for m, _ in interim] == [6, 12] and all(c is None for _, c in interim)
    assert copies == []


@pytest.mark.parametrize("bits", [4, 8])
def test_final_decoding_on_the_dequantized_base_computes_what_the_quantized_one_does(tmp_path, tiny_gemma_dir,
                                                                                     unified_data, bits):  # fmt: skip
    """A QLoRA trial on a GPU decodes its BLEU/ROUGE answers after its 4/8-bit base layers became plain
    layers of their dequantized weights, computing in the quantized layers' compute dtype: the same
    logits as the 4-bit path (close to the int8 one), and the adapter (what the trial saves) is the
    same tensors."""
    import torch
    from peft import get_peft_model_state_dict

    from duetto.trainers.methods import get_method
    from duetto.trainers.trial import decode_on_dequantized_base

    cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=qlora", f"qlora.bits={bits}")
    torch.manual_seed(0)
    model = get_method("qlora").build(cfg, str(tiny_gemma_dir), torch.bfloat16, torch.device("cpu")).model
    with torch.no_grad():  # a trained adapter: LoRA B starts at zero, which would hide a wrong base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    adapter = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        decode_on_dequantized_base(model, torch.bfloat16)
        got = model(input_ids=ids).logits.float()
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert base_q.weight.dtype == torch.bfloat16 and not base_q.weight.requires_grad
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    if bits == 4:  # bitsandbytes' own 4-bit matmul dequantizes and multiplies in the compute dtype too
        assert torch.equal(got, want)
    else:  # LLM.int8 also rounds the activations to int8
        assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    after = get_peft_model_state_dict(model)
    assert after.keys() == adapter.keys() and all(torch.equal(after[k], adapter[k]) for k in adapter)


def test_final_decoding_keeps_the_quantized_base_when_its_dequantized_weights_do_not_fit(tmp_path, tiny_gemma_dir,
                                                                                          unified_data, monkeypatch):  # fmt: skip
    import torch

    from duetto.models import dequantized_bytes
    from duetto.trainers.methods import get_method
    from duetto.trainers.trial import decode_on_dequantized_base

    cfg = _cfg(tmp_path, tiny_gemma_dir, unified_data, "method=qlora", "qlora.bits=4")
    model = get_method("qlora").build(cfg, str(tiny_gemma_dir), torch.bfloat16, torch.device("cpu")).model
    need = dequantized_bytes(model, torch.bfloat16)
    assert need > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need - 1, 10 * need))  # half: too little
    assert not decode_on_dequantized_base(model, torch.bfloat16, "cuda:0")
    assert any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need, 10 * need))
    assert decode_on_dequantized_base(model, torch.bfloat16, "cuda:0")
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
