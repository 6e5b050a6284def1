"""How a trial talks to Ray Train while the HF Trainer runs: on every save a ``ray.train.report`` with
step, losses and interim BLEU/ROUGE (rank 0 attaches the HF checkpoint), plus the measurements the
metrics need (training-step peak memory and time, trained tokens) and a fault injection for tests.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from duetto.trainers.config import TrialConfig

#: Fault injection for recovery tests: fail once when this step is reached (marker file beside it).
FAIL_AT_STEP_ENV = "DUETTO_FAIL_AT_STEP"


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def generation_metrics(model, tokenizer, rows: list[dict], cfg: TrialConfig) -> tuple[dict[str, float], list[str]]:
    """(BLEU/ROUGE, predictions) of ``rows`` with the trial's template and evaluation settings."""
    from duetto.trainers.evaluate import evaluate_generation

    batch = cfg.eval.batch_size or (256 if next(model.parameters()).is_cuda else 16)
    return evaluate_generation(model, tokenizer, rows, template=cfg.template, max_seq_len=cfg.max_seq_len,
                               max_new_tokens=cfg.eval.max_new_tokens, batch_size=batch)


def header(cfg: TrialConfig, rows, output_dir) -> str:
    """The opening line of `duetto train`: what runs, on what, where it goes."""
    held = f"{len(rows.held_out)} {rows.split} rows"
    return (f"duetto train: {cfg.method} of {cfg.model} on {len(rows.train)} train rows ({cfg.data.train}), "
            f"evaluated on {held}; {device_plan(cfg)}; output {output_dir}")  # fmt: skip


def device_plan(cfg: TrialConfig) -> str:
    """Where the trial will run, as far as is known before Ray starts."""
    s, use_gpu = cfg.scaling, cfg.scaling.use_gpu
    n = s.workers()
    where = f"{n} Ray worker" + "s" * (n > 1) if n else "in-process (Ray Train local mode)"
    if use_gpu is None:
        if n > 0 and os.environ.get("RAY_ADDRESS"):
            return f"{where}, on GPUs if the cluster has them"
        import torch

        use_gpu = torch.cuda.is_available()
    return f"{where} on {'GPU' if use_gpu else 'CPU'}"


def progress_line(state, logs: dict) -> str | None:
    """One plain line per Trainer log of a loss (with learning rate and epoch), else None."""
    if not {"loss", "eval_loss", "train_loss"} & logs.keys():
        return None
    formats = {"loss": ".4f", "eval_loss": ".4f", "train_loss": ".4f", "learning_rate": ".2e", "epoch": ".2f"}
    parts = [f"{key} {float(logs[key]):{fmt}}" for key, fmt in formats.items() if key in logs]
    return f"duetto train: step {state.global_step}/{state.max_steps}  " + "  ".join(parts)


class StepClock:
    """Summed time of the training steps, begin to end, without stalling the GPU each step.

    On a GPU each step's begin and end are CUDA events, so a step counts from when the GPU reaches it
    until its last kernel ends (idle gaps inside a step included); they are read when ``seconds()`` is
    asked for (at saves and at the end). On CPU, wall time."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self._done = 0.0
        self._open = None
        self._pairs: list = []

    def begin(self) -> None:
        import torch

        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def end(self) -> None:
        import torch

        if self._open is None:
            return
        if self.cuda:
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self._pairs.append((self._open, stop))
        else:
            self._done += time.perf_counter() - self._open
        self._open = None

    def seconds(self) -> float:
        if self._pairs:
            self._pairs[-1][1].synchronize()
            self._done += sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
            self._pairs.clear()
        return self._done


def report_callback_cls():
    """Built lazily so importing this module does not import transformers."""
    from transformers import TrainerCallback

    class DuettoReportCallback(TrainerCallback):
        """On every HF save: interim generation metrics (rank 0), then a Ray report on all ranks."""

        def __init__(self, cfg: TrialConfig, tokenizer, interim_rows: list[dict], rank: int):
            self.cfg, self.tokenizer, self.rows, self.rank = cfg, tokenizer, interim_rows, rank
            # The training steps alone, measured from each step's begin to its end: evaluation passes
            # (full-vocabulary logits), interim generation and checkpoints between steps never count.
            self.train_peak = 0  # peak GPU memory; the allocator's peak is reset as each step begins
            self.clock = StepClock()
            self.tokens_at_start = 0  # the Trainer's token count when this run began (non-zero on resume)

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens_at_start = int(state.num_input_tokens_seen or 0)

        def trained_tokens(self, state) -> int:
            """Non-padding tokens of this run's training batches, all ranks (the Trainer gathers them)."""
            return int(state.num_input_tokens_seen or 0) - self.tokens_at_start

        def tokens_per_second(self, state) -> float:
            return self.trained_tokens(state) / self.step_seconds if self.step_seconds > 0 else 0.0

        @property
        def step_seconds(self) -> float:
            return self.clock.seconds()

        def on_step_begin(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                self.train_peak = max(self.train_peak, int(torch.cuda.max_memory_allocated()))
            self.clock.end()
            fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
            marker = Path(self.cfg.output_dir) / ".injected_failure"
            if fail_at and state.global_step == fail_at and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(fail_at))
                raise RuntimeError(f"injected failure at step {fail_at} ({FAIL_AT_STEP_ENV})")

        def on_log(self, args, state, control, logs=None, **kwargs):
            line = progress_line(state, logs or {}) if self.rank == 0 else None
            if line:  # not print(): Ray Train's patched print would send the line to its logger and stdout both
                sys.stdout.write(line + "\n")
                sys.stdout.flush()

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
                metrics.update(generation_metrics(model, self.tokenizer, self.rows, self.cfg)[0])
            if self.cfg.scaling.workers() == 0:
                # Ray Train's local mode keeps no checkpoint (a local run resumes from output_dir's own
                # HF checkpoints): copying this one for it would only write the folder once more
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                source = get_last_checkpoint(args.output_dir) if self.rank == 0 else None
                if source:
                    shutil.copytree(source, Path(tmp, "checkpoint"))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)

    return DuettoReportCallback

