"""Run, or resume, a sweep: one Ray Tune ``Tuner`` whose trials each build and fit one TorchTrainer.

Ray 2.60 runs Train V2, where ``Tuner(TorchTrainer(...))`` is refused; the supported pattern is a
function trainable (``sweep_trial``) that builds the trial's TorchTrainer and forwards its reports to
Tune through ``TuneReportCallback``. The TorchTrainer stores its run under the Tune trial's own folder
with a fixed name, so whenever Tune runs a trial again (a retry after an error, or ``--resume`` after
the driver died) the TorchTrainer finds its run there and continues from its last checkpoint.

Layout of a sweep folder (Tune's experiment directory)::

    sweep.yaml        the SweepConfig as run (``--resume`` and ``report`` read it)
    base_trial.yaml   the resolved base TrialConfig every trial starts from
    <method>_<id>/    one Tune trial: params.json, result.json, progress.csv, TensorBoard events,
                      and the trial's own model/, config.yaml, metrics.json, train/ (Ray Train run)
    results.csv, results.md, best.json, pareto.png    written when the sweep ends
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from duetto.config import ConfigError, dump_yaml, from_dict, load_config, to_dict
from duetto.ray_connect import connect
from duetto.trainers.config import TrialConfig
from duetto.tune.spec import SweepConfig, base_trial_dict, check_resources, concurrent_trials, gpus_per_trial, packed_methods, param_space, resolve_packing, total_trials, trial_config

SWEEP_FILE = "sweep.yaml"
BASE_FILE = "base_trial.yaml"
TRAIN_RUN_NAME = "train"


# ----- the Tune trial (runs in a Tune actor) -----------------------------------------------------


def sweep_trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str, pack: dict[str, Any] | None = None,
                packed: tuple[str, ...] = ()) -> None:  # fmt: skip
    """One Tune trial = one TorchTrainer run of ``base`` + the sampled ``config["trial"]``.

    The trial writes into ``<sweep_dir>/<trial name>``, not ``tune.get_context().get_trial_dir()``:
    the latter is a staging folder inside this Ray session's temp dir, gone after a restart, while
    a resumed trial must find its TorchTrainer run (and checkpoints) again.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from duetto.trainers.trial import build_torch_trainer

    if config["trial"]["method"] in packed:  # ``pack`` holds its actor's resources
        from duetto.tune.packing import packed_trial

        return packed_trial(config, base, sweep_dir, **pack)
    trial_dir = str(Path(sweep_dir, tune.get_context().get_trial_name()))
    cfg = trial_config(base, config["trial"], output_dir=trial_dir)
    trainer = build_torch_trainer(cfg, storage_path=trial_dir, name=TRAIN_RUN_NAME, callbacks=[TuneReportCallback()])
    trainer.fit()  # raises when the run fails past its worker retries, so Tune sees the error


def trial_name(trial) -> str:
    """``galore_3f2a1_00004``: the method first, so tables and folders group by method."""
    method = (trial.config.get("trial") or {}).get("method", "trial")
    return f"{method}_{trial.trial_id}"


def _trainable(sweep: SweepConfig, base: dict[str, Any], sweep_dir: Path, cluster: dict[str, float] | None = None):
    from ray import tune

    pack = None
    if sweep.packing != "off":  # a pack takes what one trial would take, and that share of GPU memory
        gpus = gpus_per_trial(sweep, cluster or {})
        pack = {"gpus": gpus, "cpus": sweep.resources.cpus_per_trial, "max_trials": sweep.pack_size,
                "memory_fraction": sweep.pack_memory_fraction * (min(1.0, gpus) if gpus > 0 else 1.0)}  # fmt: skip
    fn = tune.with_parameters(sweep_trial, base=base, sweep_dir=str(sweep_dir), pack=pack,
                              packed=packed_methods(sweep.packing))  # fmt: skip
    return tune.with_resources(fn, {"cpu": sweep.resources.driver_cpus})


# ----- Ray ---------------------------------------------------------------------------------------


def _cluster() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


# ----- new sweep / resume ------------------------------------------------------------------------


def _check_inputs(base: dict[str, Any]) -> None:
    """The checks a single trial makes before Ray starts (files, schema, rows left to train and
    evaluate on), once for the whole sweep."""
    from duetto.trainers.trial_data import load_rows

    try:
        load_rows(from_dict(TrialConfig, {**base, "method": "qlora"}))
    except ConfigError as e:
        raise ConfigError(f"base.{e}") from None


def _tuner(sweep: SweepConfig, base: dict[str, Any], max_concurrent: int, cluster: dict[str, float]):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from duetto.tune.scheduler import build_scheduler

    callbacks = []
    if sweep.packing != "off":
        from duetto.tune.packing import leave_pack_callback

        callbacks.append(leave_pack_callback())
    return tune.Tuner(
        _trainable(sweep, base, sweep.sweep_dir(), cluster),
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.resolved_mode,
            scheduler=build_scheduler(sweep),
            # Given a search_alg instance, Tune ignores TuneConfig.max_concurrent_trials: the limit goes here.
            search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent),
            num_samples=1,  # the grid in param_space already repeats each method num_samples times
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=sweep.sweep_dir().name,
            storage_path=str(sweep.sweep_dir().parent),
            failure_config=tune.FailureConfig(max_failures=sweep.failures.trial_retries, fail_fast=sweep.failures.fail_fast),
            # the checkpoints Tune itself keeps (packed trials'); unpacked trials keep theirs in their TorchTrainer run
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=sweep.verbose,
            callbacks=callbacks,
        ),
    )


def prepare(sweep: SweepConfig) -> dict[str, Any]:
    """Everything checkable before Ray: the base trial, its data, its model (fetched or built once here,
    not by N concurrent trials)."""
    base = base_trial_dict(sweep)
    _check_inputs(base)
    from duetto.models import resolve_model

    base["model"] = resolve_model(base["model"])
    return base


def _fit(tuner, sweep: SweepConfig, sweep_dir: Path) -> None:
    """``tuner.fit()``; with packing, the sweep's pack actors end before it (packs a stopped driver left
    on a running cluster hold slots of trials that are gone: every unfinished packed trial rejoins a
    fresh pack from its checkpoint) and after it."""
    if sweep.packing == "off":
        tuner.fit()
        return
    from duetto.tune.packing import stop_packs

    stop_packs(str(sweep_dir))
    try:
        tuner.fit()
    finally:
        stop_packs(str(sweep_dir))


def start_sweep(sweep: SweepConfig, *, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Path:
    """Run a new sweep to the end; return its folder (results are written there)."""
    sweep_dir = sweep.sweep_dir()
    if any(sweep_dir.glob("experiment_state-*.json")):
        raise ConfigError(
            f"storage_path: {sweep_dir} already holds a sweep; finish it with `duetto sweep --resume {sweep_dir}`, "
            "or choose another name/storage_path"
        )
    base = prepare(sweep)
    connect(address, num_cpus, num_gpus)
    cluster, nodes = _cluster()
    fits = check_resources(sweep, cluster, nodes)
    # the sweep folder keeps what auto chose, so a resumed sweep runs its trials as they started
    packing, why_not = resolve_packing(sweep, base, gpus_per_trial(sweep, cluster), cluster)
    sweep = dataclasses.replace(sweep, packing=packing)
    concurrent = concurrent_trials(sweep, fits)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    resolved = from_dict(SweepConfig, {**to_dict(sweep), "storage_path": str(sweep_dir)})
    dump_yaml(resolved, sweep_dir / SWEEP_FILE)
    (sweep_dir / BASE_FILE).write_text(yaml.safe_dump(base, sort_keys=False))
    print(
        f"duetto sweep: {total_trials(sweep)} trials ({', '.join(f'{m} x{sweep.samples_for(m)}' for m in sweep.methods)}), "
        f"{gpus_per_trial(sweep, cluster):g} GPU + {sweep.resources.cpus_per_trial:g} CPU per trial, "
        f"{concurrent} at a time, {sweep.scheduler.type} on {sweep.metric} ({sweep.resolved_mode})"
        + (f", {' and '.join({'qlora': 'QLoRA', 'galore': 'GaLore'}[m] for m in packed_methods(sweep.packing))} "
           f"trials packed ({sweep.pack_size or 'as many as GPU memory holds'} per pack)" if sweep.packing != "off" else "")
        + (f" (not packed: {why_not})" if why_not else "")
        + f" -> {sweep_dir}",
        flush=True,
    )
    _fit(_tuner(sweep, base, concurrent, cluster), sweep, sweep_dir)
    return sweep_dir


def load_sweep_dir(sweep_dir: str | Path) -> tuple[SweepConfig, dict[str, Any]]:
    """The SweepConfig and base trial a sweep folder was started with."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{sweep_dir}: not a duetto sweep folder (no {SWEEP_FILE}); give the folder `duetto sweep` printed")
    return load_config(SweepConfig, path), yaml.safe_load((sweep_dir / BASE_FILE).read_text())


def resume_sweep(
    sweep_dir: str | Path, *, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
    retry_errored: bool = False,
) -> Path:
    """Finish a sweep whose driver stopped: finished trials stay as they are, unfinished ones run on
    from their TorchTrainer checkpoints, errored ones are retried only with ``retry_errored``."""
    from ray import tune

    sweep_dir = Path(sweep_dir).expanduser().resolve()
    sweep, base = load_sweep_dir(sweep_dir)
    if not tune.Tuner.can_restore(str(sweep_dir)):
        raise ConfigError(f"{sweep_dir}: Tune saved no experiment state there yet, so there is nothing to resume; start it again")
    connect(address, num_cpus, num_gpus)
    cluster, nodes = _cluster()
    check_resources(sweep, cluster, nodes)
    sweep = dataclasses.replace(sweep, packing=resolve_packing(sweep, base, gpus_per_trial(sweep, cluster), cluster)[0])
    print(f"duetto sweep: resuming {sweep_dir}", flush=True)
    tuner = tune.Tuner.restore(
        str(sweep_dir),
        trainable=_trainable(sweep, base, sweep_dir, cluster),
        resume_unfinished=True,
        resume_errored=retry_errored,
    )
    _fit(tuner, sweep, sweep_dir)
    return sweep_dir
