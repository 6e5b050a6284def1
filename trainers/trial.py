"""One trial: the Ray Train worker function, read top to bottom as setup / train / evaluate / save.

Why the HF ``Trainer`` and not a loop of our own: it already owns both methods' optimizers
(``galore_adamw_8bit_layerwise`` installs GaLore's per-parameter backward hooks, and refuses DDP and
gradient accumulation itself), gradient checkpointing, bf16 autocast, DDP under the env vars Ray Train
sets, and exact resume from its own checkpoints. We add masked tokenization (trial_data.py), Ray
reports and measurements (trial_reports.py) and generation metrics.

Checkpoint contract with Ray Train / Tune: every ``report_every_steps`` (or epoch) all workers call
``ray.train.report`` with step, losses and interim BLEU/ROUGE; rank 0 attaches the HF checkpoint. The
last report carries every ``metrics.json`` key plus ``done: True`` and a checkpoint of metrics.json
alone, so a restarted trial that had already finished just reports again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duetto.config import ConfigError, dump_yaml, flatten, from_dict, load_config, to_dict
from duetto.trainers.config import TrialConfig
from duetto.trainers.trial_data import EncodedDataset, PaddingCollator, load_rows
from duetto.trainers.trial_reports import generation_metrics, peak_memory_bytes, report_callback_cls


def resolve_dtype(precision: str, on_gpu: bool):
    """(weights dtype, autocast bf16?) for a precision setting."""
    import torch

    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    if precision == "bf16":
        return torch.bfloat16, on_gpu
    if precision == "bf16-mixed":
        return torch.float32, True
    return torch.float32, False


def _leave_single_process_group() -> None:
    """Ray Train opens a torch.distributed group even for one worker, so the HF Trainer would see
    "distributed" and refuse layer-wise GaLore ("does not support DDP"). A group of one process
    carries no gradients anywhere: drop it and the rank env vars, and the Trainer runs single-process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        os.environ.pop(var, None)


# --- the worker function ---


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: one trial of either method. ``config`` is ``to_dict(TrialConfig)``."""
    import ray.train
    import ray.train.torch
    import torch

    from duetto.trainers.compat import import_bitsandbytes, quiet_known_warnings

    quiet_known_warnings()  # first: bitsandbytes warns as transformers imports it
    import_bitsandbytes()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars garble inside Ray's log prefixes; the callback prints lines
    started = time.perf_counter()
    cfg = from_dict(TrialConfig, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    restored = _restore(rank, Path(cfg.output_dir) if world == 1 else None)
    if restored is None:  # the trial had already finished and has reported its metrics again
        return
    resume_from, resumed_step = restored
    run = _setup(cfg, device, world)
    if world == 1:
        _leave_single_process_group()
    trainer, callback = _build_trainer(cfg, run, rank)
    setup_seconds = time.perf_counter() - started
    train_loss, train_wall = float("nan"), 0.0
    if cfg.max_steps != 0:  # max_steps=0 trains nothing (the baseline)
        t0 = time.perf_counter()
        train_loss = float(trainer.train(resume_from_checkpoint=resume_from).training_loss)
        train_wall = time.perf_counter() - t0
    # GPU: the training steps' own peak; CPU: the process's peak RSS so far (before generation)
    train_peak = callback.train_peak if run.on_gpu and callback.train_peak else peak_memory_bytes(device)
    t0 = time.perf_counter()
    eval_loss = final_eval_loss(trainer)  # on all ranks; generation on rank 0 alone
    eval_seconds = time.perf_counter() - t0
    model = trainer.accelerator.unwrap_model(trainer.model)
    fast_path = _fast_path_summary(trainer, run)
    if rank == 0 and run.on_gpu and cfg.method == "qlora":
        trainer.graphed = None  # the captured step and its memory pool: training is over
        torch.cuda.empty_cache()
        decode_on_dequantized_base(model, resolve_dtype(cfg.precision, True)[0], device)
    gen_metrics, predictions = generation_metrics(model, run.tokenizer, run.gen_rows, cfg) if rank == 0 else ({}, [])
    generation_seconds = time.perf_counter() - t0 - eval_seconds
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "bleu4": gen_metrics.get("bleu4", float("nan")),
        "rougeL": gen_metrics.get("rougeL", float("nan")),
        "peak_memory_bytes": train_peak,
        "eval_peak_memory_bytes": peak_memory_bytes(device),
        "tokens_per_second": callback.tokens_per_second(trainer.state),
        "trained_tokens": callback.trained_tokens(trainer.state),
        "train_seconds": callback.step_seconds,
        "train_wall_seconds": train_wall,  # trainer.train() end to end: evaluations and checkpoints too
        "wall_seconds": time.perf_counter() - started,
        # where the wall time beside the steps goes: data, model load and trainer build; the final
        # eval loss (0 when the Trainer's last-step evaluation is reused); the BLEU/ROUGE decoding
        "phase_seconds": {"setup": setup_seconds, "train": train_wall, "eval_loss": eval_seconds,
                          "generation": generation_seconds},  # fmt: skip
        "trainable_params": run.built.trainable_params,
        "total_params": run.built.total_params,
        "num_train_examples": len(run.train_ds),
        "num_eval_examples": len(run.gen_rows),
        "eval_split": "validation" if cfg.data.val_size else "test",
        "truncated_train_examples": run.train_ds.truncated,
        "step": int(trainer.state.global_step),
        "train_loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
        "fast_path": fast_path,
        "resumed_from_step": resumed_step,
        "world_size": world,
        "device": str(torch.cuda.get_device_name(device)) if run.on_gpu else "cpu",
        "done": True,
    }
    _save_and_report(cfg, trainer, run, metrics, predictions, rank)


def decode_on_dequantized_base(model, compute_dtype, device=None) -> bool:
    """Training is over: the QLoRA base's 4/8-bit layers become plain layers holding their dequantized
    weights (duetto.models.dequantize_bnb, what `duetto serve` and `duetto report` decode on by
    default), computing in the quantized layers' ``compute_dtype`` as they did, so the final BLEU/ROUGE
    decoding runs plain matmuls instead of bitsandbytes' per-layer dequantization. The adapter, and
    what saving writes, are unchanged. On a CUDA ``device`` only while the dequantized weights fit
    (duetto.models.dequantized_fits); returns whether it dequantized."""
    from duetto.models import dequantize_bnb, dequantized_bytes, dequantized_fits

    if device is not None and not dequantized_fits(dequantized_bytes(model, compute_dtype), device):
        return False
    dequantize_bnb(model, compute_dtype, keep_io_dtype=True)
    return True


def final_eval_loss(trainer) -> float:
    """The loss on the held-out rows after training: the Trainer's own evaluation when it ran one at the
    last step (the epoch-end or save-step evaluation that ends a run), else a new pass. The model has
    not changed since, so a second pass would only repeat it."""
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step and trainer.state.global_step > 0:
        return float(last["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def _fast_path_summary(trainer, run: TrialSetup) -> str:
    """What metrics.json says about the GPU fast path: off and why, or how many steps were graph replays."""
    if run.fast_blocker is not None:
        return f"off ({run.fast_blocker})"
    graphed = getattr(trainer, "graphed", None)
    if graphed is None:
        return f"on, eager steps ({trainer.graph_blocker})"
    if graphed.failed:
        return f"on, eager steps (graph capture failed: {graphed.failed[:200]})"
    return f"on: {graphed.replays} of {trainer.state.global_step} steps replayed as a CUDA graph"


def _restore(rank: int, output_dir: Path | None) -> tuple[str | None, int] | None:
    """(HF checkpoint to resume from, its step) of a restarted trial, (None, 0) for a fresh one; None
    when the trial had already finished (its metrics are reported again).

    That is a copy of Ray's latest checkpoint when Ray has one. Ray Train's local mode keeps none, so a
    single-process trial (``output_dir`` given) then resumes from the newest complete one of its own HF
    checkpoints there, which exist at start only when `duetto train --resume` let an unfinished run
    stand (else --overwrite removed them, or the run was refused)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        saved = _complete_hf_checkpoints(output_dir) if output_dir is not None else []
        return (str(saved[-1]), _checkpoint_step(saved[-1])) if saved else (None, 0)
    with checkpoint.as_directory() as d:
        if (Path(d) / "metrics.json").exists():  # the trial had finished: report it again, done
            final = json.loads((Path(d) / "metrics.json").read_text())
            ray.train.report(final, checkpoint=checkpoint if rank == 0 else None)
            return None
        if not (Path(d) / "checkpoint").exists():
            return None, 0
        local = Path(tempfile.mkdtemp(prefix="duetto-resume-"))
        shutil.copytree(Path(d) / "checkpoint", local / "checkpoint")
    return str(local / "checkpoint"), _checkpoint_step(local / "checkpoint")


def _complete_hf_checkpoints(output_dir: Path) -> list[Path]:
    """output_dir/hf_checkpoints/checkpoint-N folders by step. A crash during a save leaves a newest
    folder without trainer_state.json (the Trainer writes it last): such a folder is skipped."""
    found = [d for d in (output_dir / "hf_checkpoints").glob("checkpoint-*")
             if d.name.rpartition("-")[2].isdigit() and (d / "trainer_state.json").is_file()]  # fmt: skip
    return sorted(found, key=lambda d: int(d.name.rpartition("-")[2]))


def _checkpoint_step(checkpoint: Path) -> int:
    state_file = checkpoint / "trainer_state.json"
    return int(json.loads(state_file.read_text()).get("global_step", 0)) if state_file.exists() else 0


@dataclass
class TrialSetup:
    """What one worker trains and evaluates: the model as the method built it, tokenizer and data."""

    model_path: str
    tokenizer: Any
    built: Any  # the method's Built
    train_ds: EncodedDataset
    eval_ds: EncodedDataset
    gen_rows: list[dict]  # held-out rows the generation metrics are computed on
    on_gpu: bool
    autocast_bf16: bool
    fast_blocker: str | None = None  # why the GPU fast path is off (None: on)


def _setup(cfg: TrialConfig, device, world: int) -> TrialSetup:
    from transformers import set_seed

    from duetto.models import load_tokenizer, resolve_model, use_attention_kernels_without_plans
    from duetto.trainers.fast_trainer import fast_path_blocker
    from duetto.trainers.methods import get_method

    set_seed(cfg.seed)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    rows = load_rows(cfg)
    gen_rows = rows.generation(cfg)
    train_ds = EncodedDataset(rows.train, tokenizer, cfg.template, cfg.max_seq_len)
    eval_ds = EncodedDataset(rows.loss(cfg), tokenizer, cfg.template, cfg.max_seq_len)

    on_gpu = device.type == "cuda"
    use_attention_kernels_without_plans(device)
    dtype, autocast_bf16 = resolve_dtype(cfg.precision, on_gpu)
    built = get_method(cfg.method).build(cfg, model_path, dtype, device)
    built.model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    blocker = fast_path_blocker(cfg, on_gpu=on_gpu, world_size=world)
    return TrialSetup(model_path, tokenizer, built, train_ds, eval_ds, gen_rows, on_gpu, autocast_bf16, blocker)


def _training_args(cfg: TrialConfig, run: TrialSetup):
    from transformers import TrainingArguments

    from duetto.trainers.compat import checkpointing_args

    every = cfg.report_every_steps
    strategy = "steps" if every > 0 else "epoch"
    layerwise = cfg.method == "galore" and cfg.galore.layerwise
    fast = run.fast_blocker is None
    method_args = dict(run.built.trainer_args)
    if fast and method_args.get("optim") == "adamw_torch":
        method_args["optim"] = "adamw_torch_fused"  # the same AdamW in one kernel per step
    return TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "hf_checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 32 if run.on_gpu else 8),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=run.autocast_bf16,
        torch_compile=cfg.compile,
        # QLoRA turned checkpointing on in prepare_model_for_kbit_training already.
        **checkpointing_args(cfg.gradient_checkpointing and cfg.method == "galore"),
        # Layer-wise GaLore has already stepped and freed each gradient inside backward.
        max_grad_norm=0.0 if layerwise else 1.0,
        logging_steps=cfg.logging_steps,
        # the NaN/inf loss filter reads every step's loss on the host: the fast path never waits a step
        logging_nan_inf_filter=not fast,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=every if every > 0 else None,
        save_steps=every if every > 0 else None,
        save_total_limit=1,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=True,  # the report callback prints one plain line per log instead
        use_cpu=not run.on_gpu,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # counted in the training loop only, gathered over ranks, carried across a resume
        include_num_input_tokens_seen="non_padding",
        **method_args,
    )


def _build_trainer(cfg: TrialConfig, run: TrialSetup, rank: int):
    """The HF Trainer (prepared for Ray Train) and the callback that reports to Ray and measures."""
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import PrinterCallback, Trainer

    from duetto.trainers.compat import layerwise_schedule_callback
    from duetto.trainers.fast_trainer import fast_trainer_cls

    interim = run.gen_rows[: cfg.interim_eval_examples] if cfg.interim_eval_examples > 0 else []
    callback = report_callback_cls()(cfg, run.tokenizer, interim, rank)
    schedule = [layerwise_schedule_callback()] if cfg.method == "galore" and cfg.galore.layerwise else []
    fast = run.fast_blocker is None
    static_shapes = cfg.compile or fast  # compiled models and CUDA graphs see one batch shape
    kwargs = dict(
        model=run.built.model,
        args=_training_args(cfg, run),
        train_dataset=run.train_ds,
        eval_dataset=run.eval_ds,
        data_collator=PaddingCollator(run.tokenizer.pad_token_id, width=cfg.max_seq_len if static_shapes else 0),
        processing_class=run.tokenizer,
        callbacks=[callback, *schedule],
    )
    if fast:
        layerwise = cfg.galore.layerwise if cfg.method == "galore" else None
        trainer = fast_trainer_cls()(galore_layerwise=layerwise, **kwargs)
        trainer.skip_final_checkpoint = cfg.scaling.workers() == 0
    else:
        trainer = Trainer(**kwargs)
    trainer.remove_callback(PrinterCallback)  # its raw log dicts: the callback prints one line per log instead
    return prepare_trainer(trainer), callback


def _save_and_report(cfg: TrialConfig, trainer, run: TrialSetup, metrics: dict[str, Any], predictions: list[str],
                     rank: int) -> None:
    """Rank 0 writes model/, config.yaml, predictions.jsonl and metrics.json; every rank reports the
    final metrics, rank 0 with a checkpoint of metrics.json alone (so a restart reports it again)."""
    import ray.train

    out = Path(cfg.output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        final_ckpt = None
        if rank == 0:
            model_dir = out / "model"
            if model_dir.exists():
                shutil.rmtree(model_dir)
            if cfg.method == "baseline":  # nothing changed: the base model is the output
                model_dir = Path(run.model_path)
            else:
                trainer.save_model(str(model_dir))  # PEFT saves only the adapter, GaLore the full model
                run.tokenizer.save_pretrained(str(model_dir))
            text = write_outputs(cfg, run.model_path, model_dir, run.gen_rows, predictions, metrics)
            Path(tmp, "metrics.json").write_text(text)
            shutil.rmtree(out / "hf_checkpoints", ignore_errors=True)  # Ray holds its own copy
            final_ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=final_ckpt)


def write_outputs(cfg: TrialConfig, model_path: str, model_dir: Path, gen_rows: list[dict], predictions: list[str],
                  metrics: dict[str, Any]) -> str:  # fmt: skip
    """config.yaml (resolved), predictions.jsonl and metrics.json (with model_dir) into output_dir;
    returns the metrics.json text."""
    out = Path(cfg.output_dir)
    resolved = to_dict(cfg)
    resolved["model"] = model_path
    dump_yaml(resolved, out / "config.yaml")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row, pred in zip(gen_rows, predictions):
            f.write(json.dumps({"instruction": row["instruction"], "input": row.get("input", ""),
                                "reference": row["response"], "prediction": pred}, ensure_ascii=False) + "\n")
    metrics["model_dir"] = str(model_dir.resolve()) if model_dir.exists() else str(model_dir)
    text = json.dumps(metrics, indent=2, allow_nan=True)
    (out / "metrics.json").write_text(text)
    return text


# --- driver side ---


def build_torch_trainer(cfg: TrialConfig, *, storage_path: str, name: str, callbacks: list | None = None):
    """The TorchTrainer for one trial (the sweep builds one per Tune trial with this)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    workers = s.workers()
    if s.use_gpu is not None:
        use_gpu = s.use_gpu
    elif workers == 0:
        import torch

        use_gpu = torch.cuda.is_available()
    else:
        import ray

        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    cfg_dict = to_dict(cfg)
    cfg_dict["output_dir"] = str(Path(cfg.output_dir).resolve())
    cfg_dict["scaling"]["num_workers"] = workers  # resolved here: a worker reads whether it runs in local mode
    for key in ("train", "test"):
        cfg_dict["data"][key] = str(Path(cfg_dict["data"][key]).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg_dict,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Resuming needs only the newest checkpoint; full GaLore checkpoints of every report of
            # every trial of a sweep would fill a disk (Train V2 keeps all by default).
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def run_trial(cfg: TrialConfig, *, storage_path: str | None = None, name: str | None = None, resume: bool = False,
              overwrite: bool = False) -> dict:
    """Run one trial to the end on Ray Train and return its metrics (also in output_dir/metrics.json).

    Before any Ray worker starts: the data is read and checked, and an ``output_dir`` that already holds
    a run is refused unless ``resume`` (same settings: Ray Train continues from its last checkpoint, or
    reports a finished run again) or ``overwrite`` (the earlier run's files are removed) says otherwise.
    """
    from duetto.trainers.compat import quiet_known_warnings
    from duetto.trainers.trial_reports import header

    quiet_known_warnings()
    rows = load_rows(cfg)
    out = Path(cfg.output_dir).resolve()
    run_dir = Path(storage_path or out / "ray").resolve() / (name or "trial")
    check_output_dir(cfg, run_dir, resume=resume, overwrite=overwrite)
    print(header(cfg, rows, out), flush=True)
    workers = cfg.scaling.workers()
    metrics_file = out / "metrics.json"
    if resume and workers == 0 and metrics_file.exists():
        return json.loads(metrics_file.read_text())  # finished: local mode keeps no Ray checkpoint to report it from
    if workers > 0:  # local mode (0 workers) runs in this process: no cluster needed
        from duetto.ray_connect import connect

        connect()
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "trial.yaml")
    trainer = build_torch_trainer(cfg, storage_path=str(run_dir.parent), name=run_dir.name)
    result = trainer.fit()
    if result.error:
        raise result.error
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    return dict(result.metrics or {})


#: What a trial writes into output_dir (besides Ray Train's run folder): what ``overwrite`` removes.
RUN_FILES = ("metrics.json", "config.yaml", "trial.yaml", "predictions.jsonl", "model", "hf_checkpoints",
             ".injected_failure")  # fmt: skip


def check_output_dir(cfg: TrialConfig, run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder holding an earlier run: Ray Train would find that run's snapshot
    and carry on from it (or report its old metrics) whatever the settings now are."""
    out = Path(cfg.output_dir).resolve()
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    earlier = [n for n in ("metrics.json", "trial.yaml", "model") if (out / n).exists()] or run_dir.exists()
    if not earlier:
        if resume:
            raise ConfigError(f"--resume: {out} holds no run to resume")
        return
    state = "a finished run (metrics.json)" if (out / "metrics.json").exists() else "an unfinished run"
    if overwrite:
        for item in [*(out / n for n in RUN_FILES), run_dir]:
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink(missing_ok=True)
        return
    if not resume:
        raise ConfigError(f"output_dir: {out} already holds {state}. Resume it with --resume (same settings), "
                          f"replace it with --overwrite, or choose a new output_dir")  # fmt: skip
    saved = out / "trial.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {out} has no trial.yaml to compare settings with; use --overwrite or a new output_dir")
    differ = settings_diff(load_config(TrialConfig, saved), cfg)
    if differ:
        raise ConfigError(f"--resume: the settings differ from those of the run in {out} ({saved}): "
                          + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in differ)
                          + ". Resume with the same settings, or use --overwrite or a new output_dir")  # fmt: skip


def settings_diff(before: TrialConfig, now: TrialConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, before, now) for every setting that differs; data paths compared resolved. Where the
    run happens is no setting of the trial: num_workers auto matches any count (a run on Ray workers
    resumes in local mode from its HF checkpoints, and the other way round)."""
    a, b = _flat(before), _flat(now)
    auto = "auto" in (a.get("scaling.num_workers"), b.get("scaling.num_workers"))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not (auto and k == "scaling.num_workers")]  # fmt: skip


def _flat(cfg: TrialConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    del d["output_dir"]  # the same folder by definition
    for key in ("train", "test"):
        d["data"][key] = str(Path(d["data"][key]).resolve())
    return flatten(d)
