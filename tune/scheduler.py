"""Early stopping for a sweep: ASHA, either shared by all trials or one instance per method.

Why per method: one sweep holds GaLore (full fine-tune) and QLoRA (adapters) trials, whose losses and
scores differ by method as much as by hyper-parameters. A shared ASHA would cut every trial of the
weaker method at its first rung and leave nothing to compare; one ASHA per method cuts a trial only
for doing worse than trials of its own method, so each method keeps a best trial.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from duetto.tune.spec import SweepConfig

#: ASHA's rung ladder needs a ceiling; trials end by their own max_steps/epochs long before it.
ASHA_MAX_T = 100_000


def make_asha(grace_period: int, reduction_factor: float, metric: str | None = None, mode: str | None = None):
    return AsyncHyperBandScheduler(
        time_attr="training_iteration",  # one unit = one trial report (every report_every_steps steps)
        metric=metric,
        mode=mode,
        max_t=ASHA_MAX_T,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        stop_last_trials=False,  # never cut a trial for length; it ends at its own max_steps/epochs
    )


def trial_method(trial: Trial) -> str:
    return str((trial.config.get("trial") or {}).get("method", ""))


class PerMethodScheduler(FIFOScheduler):
    """Routes every trial to its own method's ASHA; metric and mode come from TuneConfig."""

    def __init__(self, grace_period: int, reduction_factor: float):
        super().__init__()
        self._grace_period = grace_period
        self._reduction_factor = reduction_factor
        self._mode: str | None = None
        self._by_method: dict[str, AsyncHyperBandScheduler] = {}
        self._owner: dict[str, str] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def _child(self, trial: Trial) -> AsyncHyperBandScheduler:
        method = self._owner.setdefault(trial.trial_id, trial_method(trial))
        if method not in self._by_method:
            self._by_method[method] = make_asha(self._grace_period, self._reduction_factor, self._metric, self._mode)
        return self._by_method[method]

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._child(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._child(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self._child(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        child = self._child(trial)
        if trial.trial_id in child._trial_info:  # ASHA forgets a trial on completion; never twice
            child.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        child = self._child(trial)
        if trial.trial_id in child._trial_info:
            child.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"[{m}] {c.debug_string()}" for m, c in sorted(self._by_method.items())) or "ASHA per method"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def build_scheduler(sweep: SweepConfig) -> TrialScheduler:
    if sweep.scheduler.type == "fifo":
        return FIFOScheduler()
    if sweep.scheduler.per_method:
        return PerMethodScheduler(sweep.scheduler.grace_period, sweep.scheduler.reduction_factor)
    return make_asha(sweep.scheduler.grace_period, sweep.scheduler.reduction_factor)
