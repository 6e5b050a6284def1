"""One trial: the Ray Train worker function, read top to bottom as setup / train / evaluate / save.

Why the HF ``Trainer`` and not a loop of our own: it already owns both methods' optimizers
(``galore_adamw_8bit_layerwise`` installs GaLore's per-parameter backward hooks, and refuses DDP and
gradient accumulation itself), gradient checkpointing, bf16 autocast, DDP under ``torchrun``-style
env vars (which Ray Train sets), and exact resume from its own checkpoints. We add only what the
study needs: masked tokenization, a token counter, generation metrics and Ray reports.

Checkpoint contract with Ray Train / Tune: every ``report_every_steps`` (or epoch) all workers call
``ray.train.report`` with step, losses and interim BLEU/ROUGE; rank 0 attaches the HF checkpoint.
The last report carries every ``metrics.json`` key plus ``done: True`` and a small checkpoint holding
metrics.json, so a restarted trial that had already finished just reports again.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from duetto.config import ConfigError, dump_yaml, from_dict, to_dict
from duetto.trainers.config import TrialConfig

#: Fault injection for recovery tests: fail once when this step is reached (marker file beside it).
FAIL_AT_STEP_ENV = "DUETTO_FAIL_AT_STEP"
METRIC_KEYS = (
    "method",
    "train_loss",
    "eval_loss",
    "bleu4",
    "rougeL",
    "peak_memory_bytes",
    "tokens_per_second",
    "wall_seconds",
    "trainable_params",
    "total_params",
    "num_train_examples",
    "num_eval_examples",
)


# ---------------------------------------------------------------------------------------------
# small pieces the worker uses
# ---------------------------------------------------------------------------------------------


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


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class EncodedDataset:
    """Tokenized unified rows (lists), padded per batch by the collator."""

    def __init__(self, rows: list[dict], tokenizer, template: str, max_seq_len: int):
        from duetto.data.prompts import encode_example

        self.items = []
        self.truncated = 0
        for row in rows:
            enc = encode_example(row, tokenizer, template=template, max_seq_len=max_seq_len)
            self.truncated += bool(enc.get("truncated"))
            self.items.append({k: enc[k] for k in ("input_ids", "attention_mask", "labels")})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PaddingCollator:
    """Pads a batch (labels -100 on padding, by attention mask).

    ``width`` pads every batch to one fixed length: compiled models then see one shape instead of
    recompiling for every new longest example (measured on the H200: ~60 s per step otherwise).
    Trained tokens are counted by the Trainer (``include_num_input_tokens_seen``), not here: the
    Trainer collates its evaluation batches with this same collator."""

    def __init__(self, pad_id: int, width: int = 0):
        self.pad_id = pad_id
        self.width = width

    def __call__(self, features: list[dict]) -> dict:
        from duetto.data.prompts import pad_batch

        return pad_batch(features, self.pad_id, side="right", width=self.width)


def _read_rows(path: str, limit: int = 0) -> list[dict]:
    from duetto.data.unify import read_jsonl

    rows = read_jsonl(path)
    return rows[:limit] if limit and limit > 0 else rows


def split_validation(train_rows: list[dict], val_size: float, source: str) -> tuple[list[dict], list[dict]]:
    """(train, validation): the last ``val_size`` rows (a fraction < 1, or a count) are held out.
    `duetto data prepare` has already shuffled the file with its seed, so the tail is a random sample,
    and every trial of a sweep holds out the same rows."""
    n = round(val_size * len(train_rows)) if val_size < 1 else int(val_size)
    if n < 1 or n >= len(train_rows):
        raise ConfigError(f"data.val_size={val_size:g}: {source} has {len(train_rows)} training rows, "
                          f"which leaves {len(train_rows) - n} to train on and {n} to validate on")  # fmt: skip
    return train_rows[:-n], train_rows[-n:]


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


def _report_callback_cls():
    """Built lazily so importing this module does not import transformers."""
    from transformers import TrainerCallback

    class DuettoReportCallback(TrainerCallback):
        """On every HF save: interim generation metrics (rank 0), then a Ray report on all ranks."""

        def __init__(self, cfg: TrialConfig, tokenizer, interim_rows: list[dict], rank: int):
            self.cfg, self.tokenizer, self.rows, self.rank = cfg, tokenizer, interim_rows, rank
            self.train_peak = 0
            """Peak GPU memory of the training steps alone: the allocator's peak is reset as each step
            begins and read as it ends, so HF's evaluation passes between steps (eval batches with
            full-vocabulary logits) and interim generation never count as training memory."""
            self.step_seconds = 0.0
            """Time inside the optimizer steps alone (forward, backward, update), summed: the
            evaluation passes, interim generation and checkpoints that run between steps are not
            training time. The GPU is synchronised at each step's end so its queued work counts."""
            self.tokens_at_start = 0  # the Trainer's token count when this run began (non-zero on resume)
            self._step_t0 = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens_at_start = int(state.num_input_tokens_seen or 0)

        def trained_tokens(self, state) -> int:
            """Non-padding tokens of this run's training batches, all ranks (the Trainer gathers them)."""
            return int(state.num_input_tokens_seen or 0) - self.tokens_at_start

        def tokens_per_second(self, state) -> float:
            return self.trained_tokens(state) / self.step_seconds if self.step_seconds > 0 else 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self._step_t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.train_peak = max(self.train_peak, int(torch.cuda.max_memory_allocated()))
            self.step_seconds += time.perf_counter() - self._step_t0
            fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
            marker = Path(self.cfg.output_dir) / ".injected_failure"
            if fail_at and state.global_step == fail_at and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(fail_at))
                raise RuntimeError(f"injected failure at step {fail_at} ({FAIL_AT_STEP_ENV})")

        def on_save(self, args, state, control, model=None, **kwargs):
            import ray.train
            from transformers.trainer_utils import get_last_checkpoint

            metrics: dict[str, Any] = {"step": state.global_step, "epoch": float(state.epoch or 0.0),
                                       "eval_split": "validation" if self.cfg.data.val_size else "test"}
            if model is not None:  # so far; a trial ASHA stops still shows its memory and speed
                metrics["peak_memory_bytes"] = self.train_peak or peak_memory_bytes(next(model.parameters()).device)
            if self.step_seconds > 0:
                metrics["tokens_per_second"] = self.tokens_per_second(state)
            for log in state.log_history:
                if "loss" in log:
                    metrics["train_loss"] = float(log["loss"])
                if "eval_loss" in log:
                    metrics["eval_loss"] = float(log["eval_loss"])
            if self.rows and self.rank == 0 and model is not None:
                from duetto.trainers.evaluate import evaluate_generation

                m, _ = evaluate_generation(
                    model,
                    self.tokenizer,
                    self.rows,
                    template=self.cfg.template,
                    max_seq_len=self.cfg.max_seq_len,
                    max_new_tokens=self.cfg.eval.max_new_tokens,
                    batch_size=self.cfg.eval.batch_size,
                )
                metrics.update(m)
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                source = get_last_checkpoint(args.output_dir) if self.rank == 0 else None
                if source:
                    shutil.copytree(source, Path(tmp, "checkpoint"))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)

    return DuettoReportCallback


# ---------------------------------------------------------------------------------------------
# the worker function
# ---------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: one trial of either method. ``config`` is ``to_dict(TrialConfig)``."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from duetto.models import ensure_pad_token, load_tokenizer, resolve_model
    from duetto.trainers.evaluate import evaluate_generation
    from duetto.trainers.methods import get_method

    # --- setup -----------------------------------------------------------------------------
    started = time.perf_counter()
    cfg = from_dict(TrialConfig, config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    resume_from, resumed_from_step = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        local = Path(tempfile.mkdtemp(prefix="duetto-resume-"))
        with checkpoint.as_directory() as d:
            if (Path(d) / "metrics.json").exists():  # the trial had finished: report it again, done
                final = json.loads((Path(d) / "metrics.json").read_text())
                ray.train.report(final, checkpoint=checkpoint if rank == 0 else None)
                return
            if (Path(d) / "checkpoint").exists():
                shutil.copytree(Path(d) / "checkpoint", local / "checkpoint")
                resume_from = str(local / "checkpoint")
                state_file = local / "checkpoint" / "trainer_state.json"
                if state_file.exists():
                    resumed_from_step = int(json.loads(state_file.read_text()).get("global_step", 0))

    set_seed(cfg.seed)
    model_path = resolve_model(cfg.model)
    tokenizer = ensure_pad_token(load_tokenizer(model_path))
    train_rows = _read_rows(cfg.data.train, cfg.data.limit_train)
    if cfg.data.val_size:
        train_rows, held_out = split_validation(train_rows, cfg.data.val_size, cfg.data.train)
    else:
        held_out = _read_rows(cfg.data.test)
    gen_rows = held_out[: cfg.eval.num_examples] if cfg.eval.num_examples > 0 else held_out
    loss_rows = held_out[: cfg.eval.loss_examples] if cfg.eval.loss_examples > 0 else held_out
    train_ds = EncodedDataset(train_rows, tokenizer, cfg.template, cfg.max_seq_len)
    eval_ds = EncodedDataset(loss_rows, tokenizer, cfg.template, cfg.max_seq_len)

    dtype, autocast_bf16 = resolve_dtype(cfg.precision, on_gpu)
    method = get_method(cfg.method)
    built = method.build(cfg, model_path, dtype, device)
    model = built.model
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing

    # --- train -----------------------------------------------------------------------------
    if world == 1:
        _leave_single_process_group()
    every = cfg.report_every_steps
    strategy = "steps" if every > 0 else "epoch"
    layerwise = cfg.method == "galore" and cfg.galore.layerwise
    args = TrainingArguments(
        output_dir=str(out / "hf_checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 8),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=autocast_bf16,
        torch_compile=cfg.compile,
        # QLoRA turned checkpointing on in prepare_model_for_kbit_training already.
        gradient_checkpointing=cfg.gradient_checkpointing and cfg.method == "galore",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # Layer-wise GaLore has already stepped and freed each gradient inside backward.
        max_grad_norm=0.0 if layerwise else 1.0,
        logging_steps=cfg.logging_steps,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=every if every > 0 else None,
        save_steps=every if every > 0 else None,
        save_total_limit=1,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=rank != 0,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # counted in the training loop only, gathered over ranks, carried across a resume
        include_num_input_tokens_seen="non_padding",
        **built.trainer_args,
    )
    collator = PaddingCollator(tokenizer.pad_token_id, width=cfg.max_seq_len if cfg.compile else 0)
    interim = gen_rows[: cfg.interim_eval_examples] if cfg.interim_eval_examples > 0 else []
    callback = _report_callback_cls()(cfg, tokenizer, interim, rank)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    from ray.train.huggingface.transformers import prepare_trainer

    trainer = prepare_trainer(trainer)

    train_loss = float("nan")
    train_wall = 0.0
    if cfg.max_steps != 0:
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume_from)
        train_wall = time.perf_counter() - t0
        train_loss = float(result.training_loss)
    # GPU: the training steps' own peak; CPU: the process's peak RSS so far (before generation)
    train_peak = callback.train_peak if on_gpu and callback.train_peak else peak_memory_bytes(device)
    tokens = callback.trained_tokens(trainer.state)

    # --- evaluate --------------------------------------------------------------------------
    eval_loss = float(trainer.evaluate()["eval_loss"])
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    gen_metrics: dict[str, float] = {}
    predictions: list[str] = []
    if rank == 0:
        gen_metrics, predictions = evaluate_generation(
            unwrapped,
            tokenizer,
            gen_rows,
            template=cfg.template,
            max_seq_len=cfg.max_seq_len,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
        )

    # --- save ------------------------------------------------------------------------------
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "bleu4": gen_metrics.get("bleu4", float("nan")),
        "rougeL": gen_metrics.get("rougeL", float("nan")),
        "peak_memory_bytes": train_peak,
        "eval_peak_memory_bytes": peak_memory_bytes(device),
        "tokens_per_second": callback.tokens_per_second(trainer.state),
        "trained_tokens": tokens,
        "train_seconds": callback.step_seconds,
        "train_wall_seconds": train_wall,  # trainer.train() end to end: evaluations and checkpoints too
        "wall_seconds": time.perf_counter() - started,
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "num_train_examples": len(train_ds),
        "num_eval_examples": len(gen_rows),
        "eval_split": "validation" if cfg.data.val_size else "test",
        "truncated_train_examples": train_ds.truncated,
        "step": int(trainer.state.global_step),
        "resumed_from_step": resumed_from_step,
        "world_size": world,
        "device": str(torch.cuda.get_device_name(device)) if on_gpu else "cpu",
        "done": True,
    }
    with tempfile.TemporaryDirectory() as tmp:
        final_ckpt = None
        if rank == 0:
            model_dir = out / "model"
            if model_dir.exists():
                shutil.rmtree(model_dir)
            if cfg.method == "baseline":  # nothing changed: the base model is the output
                model_dir = Path(model_path)
            else:
                trainer.save_model(str(model_dir))  # PEFT saves only the adapter, GaLore the full model
                tokenizer.save_pretrained(str(model_dir))
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
            Path(tmp, "metrics.json").write_text(text)
            shutil.rmtree(out / "hf_checkpoints", ignore_errors=True)  # Ray holds its own copy
            final_ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=final_ckpt)


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------


def _cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def build_torch_trainer(cfg: TrialConfig, *, storage_path: str, name: str, callbacks: list | None = None):
    """The TorchTrainer for one trial (the sweep builds one per Tune trial with this)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    if s.use_gpu is not None:
        use_gpu = s.use_gpu
    elif s.num_workers == 0:
        import torch

        use_gpu = torch.cuda.is_available()
    else:
        use_gpu = _cluster_has_gpu()
    resources = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    cfg_dict = to_dict(cfg)
    cfg_dict["output_dir"] = str(Path(cfg.output_dir).resolve())
    for key in ("train", "test"):
        cfg_dict["data"][key] = str(Path(cfg_dict["data"][key]).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg_dict,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
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


def run_trial(cfg: TrialConfig, *, storage_path: str | None = None, name: str | None = None) -> dict:
    """Run one trial to the end on Ray Train and return its metrics (also in output_dir/metrics.json)."""
    if cfg.scaling.num_workers > 0:  # local mode (0 workers) runs in this process: no cluster needed
        from duetto.ray_connect import connect

        connect()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "trial.yaml")
    trainer = build_torch_trainer(cfg, storage_path=storage_path or str(out / "ray"), name=name or "trial")
    result = trainer.fit()
    if result.error:
        raise result.error
    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    return dict(result.metrics or {})
