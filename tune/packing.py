"""Packed sweeps: one packing actor per group of shared settings (trainers/pack_groups.py ``group_key``;
the method is one of them), on one trial's GPU share, trains the trials attached to it together
(QLoRA trials on one base: trainers/packed_run.py ``Pack``; GaLore trials on stacked weights:
trainers/stacked_galore.py ``GaloreStack``), while each configuration stays its own Ray Tune trial.

A Tune trial is a thin client (``packed_trial``): it joins the actor with its config, then moves its
trial on one report interval at a time (``advance``) and hands each report to Tune, so ASHA sees the
same reports and makes the same decisions as for a trial trained alone. Between two ``advance`` calls
the trial waits in the pack without stepping: a trial ASHA stops never trains past its last report.
The pack steps its trials in lockstep (trainers/packed_run.py ``Pack.to_step``): those ahead wait, a
while, for those behind, so that its steps and reports hold every trial at once.
Its slot is freed when Tune says the trial ended (``LeavePack``, a Tune callback) or when it finishes.

A pack sizes itself (``Pack.has_room``): a trial joins when the GPU memory the pack's steps took per
trial so far leaves room for one more within its share of the GPU, and at most ``pack_size`` trials
(the sweep's setting; 0 = memory alone). A trial that finds no room waits in ``join`` until one leaves.

Each interim report carries the trial's checkpoint (its adapter, AdamW, schedule and progress:
``Pack.state``), so a trial that Tune restarts (a resumed sweep, a retried failure) rejoins a pack
from its last report and trains on as if it had never stopped.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from duetto.tune.spec import MAX_PACK_CLIENTS

ACTOR_NAME = "duetto-pack"
#: A packed trial's Tune checkpoint: one file, Pack.state's bytes.
STATE_FILE = "packed_trial.pt"


# A packed sweep runs at most MAX_PACK_CLIENTS packed trials at once (tune/spec.py concurrent_trials),
# each with at most one call of its pack's at a time: the actor's threads never run out while
# clients wait in join or advance (the rest serve leave and attached).
@ray.remote(max_concurrency=MAX_PACK_CLIENTS + 16)
class PackActor:
    """Owns the shared base and every attached trial; one thread steps the pack, client calls wait.
    A step that fails ends the trials that took part in it (their clients get the error, so Tune
    retries them from their checkpoints); the pack goes on with the others."""

    def __init__(self, device: str = "auto", max_trials: int = 0, memory_fraction: float = 0.9, method: str = "qlora"):
        import torch

        from duetto.trainers.compat import import_bitsandbytes, quiet_known_warnings

        quiet_known_warnings()
        import_bitsandbytes()
        from duetto.trainers.packed_run import new_pack

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pack = new_pack(method, torch.device(device), max_trials=max_trials, memory_fraction=memory_fraction)
        self.keys: dict[str, int] = {}
        self.errors: dict[int, BaseException] = {}
        """The error of the failed step each trial took part in, until its client reads it."""
        self.reports: dict[int, dict[str, Any]] = {}
        """Interim reports made beside another trial's (one decoding pass), until their clients ask."""
        self.finished: dict[int, dict[str, Any]] = {}
        """Final metrics made beside another trial's (shared decoding passes), until their clients ask."""
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="pack-steps").start()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    live, wait = self.pack.to_step(time.monotonic())
                    if live:
                        break
                    self.cond.wait(timeout=wait)
                try:
                    self.pack.step(live)
                except BaseException as e:
                    for t in live:
                        self.errors[t] = e
                        self.pack.leave(t)
                self.cond.notify_all()

    def join(self, key: str, cfg: dict[str, Any], state: bytes | None = None) -> dict[str, int]:
        """Attach a trial (``state``: its checkpoint, to go on from there); {total, step} of its steps."""
        from duetto.config import from_dict
        from duetto.trainers.config import TrialConfig

        with self.cond:
            if key in self.keys:  # the trial's earlier attempt (Tune restarted it): gone, its slot freed
                old = self.keys.pop(key)
                self._drop(old)
                self.cond.notify_all()  # its advance, if one still waits, returns
            while not self.pack.has_room():  # woken by each step and each leave
                self.cond.wait()
            t = self.pack.join(from_dict(TrialConfig, cfg), until=0, state=state)
            self.keys[key] = t
            tr = self.pack.trials[t]
            return {"total": tr.total, "step": tr.step}

    def state(self, key: str) -> bytes:
        """The trial's checkpoint at its current step (trainers/packed_run.py Pack.state)."""
        with self.cond:
            return self.pack.state(self.keys[key])

    def advance(self, key: str, until: int) -> dict[str, Any]:
        """Let the trial run to step ``until``; returns its report there (Pack.interim_report)."""
        with self.cond:
            t = self.keys[key]
            tr = self.pack.trials[t]
            tr.until = until
            self.cond.notify_all()
            # this attempt's trial: a restarted trial joins under the same key as another trial
            while tr.step < min(until, tr.total) and t not in self.errors and self.keys.get(key) == t:
                self.cond.wait()
            if t in self.errors:
                self.keys.pop(key, None)
                raise self.errors.pop(t)
            if self.keys.get(key) != t:  # left meanwhile (Tune ended or restarted the trial): nobody reads this
                return {"step": tr.step, "left": True}
            if tr.step < tr.total:  # an interim report: what the trial alone reports there
                if t not in self.reports:  # with every other trial whose report is due
                    made = self._with_others(t, self._report_due, self.pack.interim_reports)
                    for u in made:
                        self.pack.trials[u].reported = self.pack.trials[u].step
                    self.reports.update(made)
                return self.reports.pop(t)
            return {"step": tr.step}

    def _drop(self, t: int) -> None:
        """Trial t leaves the pack, with whatever was kept for its client."""
        self.pack.leave(t)
        for kept in (self.errors, self.reports, self.finished):
            kept.pop(t, None)

    def _with_others(self, t: int, due: Callable[[int], bool], make: Callable[[list[int]], dict]) -> dict:
        """``make`` for trial t and every other attached trial that ``due`` says waits too (their
        answers decode together); if that fails, for t alone: t fails only for its own part."""
        together = [t] + [u for u in self.keys.values() if u != t and due(u)]
        try:
            return make(together)
        except Exception:
            if len(together) == 1:
                raise
            return make([t])

    def _report_due(self, t: int) -> bool:
        """Whether trial t waits at a report step whose report is not made yet."""
        tr = self.pack.trials.get(t)
        return (tr is not None and 0 < tr.step == tr.until < tr.total and tr.reported != tr.step
                and t not in self.reports and t not in self.errors)  # fmt: skip

    def finish(self, key: str) -> dict[str, Any]:
        """The trial's final metrics (Pack.finish_all), made with every other trial that has reached
        its last step: their answers decode together, and wait here until their clients ask."""
        with self.cond:
            t = self.keys.pop(key)
            try:
                if t not in self.finished:
                    self.finished.update(self._with_others(t, self._finish_due, self.pack.finish_all))
                return self.finished.pop(t)
            except BaseException:  # its slot and adapter go back to the pack all the same
                self._drop(t)
                raise
            finally:
                self.cond.notify_all()  # slots are free

    def _finish_due(self, t: int) -> bool:
        """Whether trial t has taken its last step and waits to be finished."""
        tr = self.pack.trials.get(t)
        return tr is not None and tr.step >= tr.total and t not in self.errors  # finished ones have left

    def leave(self, key: str) -> None:
        with self.cond:
            t = self.keys.pop(key, None)
            if t is not None:
                self._drop(t)
            self.cond.notify_all()

    def attached(self) -> list[str]:
        with self.cond:
            return sorted(self.keys)


def pack_actor_name(sweep_dir: str, group: str) -> str:
    import hashlib

    return f"{ACTOR_NAME}-{hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:8]}-{group}"


def packed_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str, actor_name: str = "",
                 gpus: float = 0.0, cpus: float = 1.0, max_trials: int = 0, memory_fraction: float = 0.9) -> None:  # fmt: skip
    """The Tune trial of a packed configuration: join, report interval by interval, finish.
    Without ``actor_name`` it joins (or starts, with ``gpus``/``cpus``, at most ``max_trials`` trials
    within ``memory_fraction`` of the GPU) the pack of its sweep for trials of its shared settings
    (trainers/pack_groups.py group_key). Each interim report carries the trial's checkpoint, so a
    restarted trial goes on from its last report."""
    from ray import tune

    from duetto.config import to_dict
    from duetto.trainers.pack_groups import group_key
    from duetto.tune.spec import trial_config

    key = tune.get_context().get_trial_id()
    cfg = trial_config(base, config["trial"], output_dir=str(Path(sweep_dir, tune.get_context().get_trial_name())))
    if actor_name:
        actor = ray.get_actor(actor_name)
    else:
        name = pack_actor_name(sweep_dir, group_key(cfg))
        # detached, outside this trial's placement group: the pack outlives the trial that started it
        # (the sweep ends it, stop_packs), and takes its own GPU share, not this trial's
        actor = PackActor.options(name=name, get_if_exists=True, num_gpus=gpus, num_cpus=cpus, lifetime="detached",
                                  scheduling_strategy="DEFAULT").remote("auto", max_trials, memory_fraction, cfg.method)  # fmt: skip
    saved = tune.get_checkpoint()  # set when Tune restarts this trial (a resumed sweep, a retry)
    state = None
    if saved is not None:
        with saved.as_directory() as d:
            state = Path(d, STATE_FILE).read_bytes()
    at = ray.get(actor.join.remote(key, to_dict(cfg), state))
    total = at["total"]
    every = cfg.report_every_steps if cfg.report_every_steps > 0 else total
    for until in range(every, total, every):
        if until <= at["step"]:  # reported before the checkpoint it went on from
            continue
        report = ray.get(actor.advance.remote(key, until))
        if report.get("left"):
            return
        # the checkpoint travels as bytes: the pack actor may run on another node than this trial
        with tempfile.TemporaryDirectory(prefix="duetto-pack-") as d:
            Path(d, STATE_FILE).write_bytes(ray.get(actor.state.remote(key)))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))
    ray.get(actor.advance.remote(key, total))
    tune.report({**ray.get(actor.finish.remote(key)), "done": True})


def pack_actors(prefix: str = ACTOR_NAME) -> list[str]:
    from ray.util import list_named_actors

    return [n for n in list_named_actors() if n.startswith(prefix)]


def stop_packs(sweep_dir: str) -> None:
    """End the pack actors of a sweep (their trials have all finished or left)."""
    for name in pack_actors(pack_actor_name(sweep_dir, "")):
        try:
            ray.kill(ray.get_actor(name))
        except ValueError:
            pass


def leave_pack_callback(actor_name: str = ""):
    """A Tune callback that frees a trial's slot in its pack when Tune ends it (ASHA stop, error):
    ``actor_name``'s, or every pack actor's (a trial is in one at most; leave is a no-op elsewhere)."""
    from ray.tune import Callback

    class LeavePack(Callback):
        def _leave(self, trial) -> None:
            for name in [actor_name] if actor_name else pack_actors():
                try:
                    ray.get_actor(name).leave.remote(trial.trial_id)
                except ValueError:  # no pack actor (any more)
                    pass

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._leave(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._leave(trial)

    return LeavePack()
