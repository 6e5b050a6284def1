"""The sweep file: a typed ``SweepConfig`` plus the per-method search spaces it turns into one Tune space.

A sweep names a base trial (a trial YAML and/or inline ``base:`` keys), and per method a search space
whose keys are TrialConfig keys. Everything is checked before Ray starts: unknown keys, empty spaces,
distributions whose samples the trial config would reject, a metric ASHA would never see, resources
no Ray node can give. Only stdlib and duetto.config are imported here, so `duetto --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from duetto.config import ConfigError, from_dict, load_config, merge_dicts, nest, read_yaml, to_dict
from duetto.trainers.config import TrialConfig
from duetto.trainers.pack_groups import PACKABLE, SHARED, unpackable

METHODS = ("galore", "qlora")
#: metric -> the direction that is better; the trial reports all three at every report.
METRICS = {"rougeL": "max", "bleu4": "max", "eval_loss": "min"}
#: distribution name -> number of arguments (Tune's own functions of the same names build them).
DISTRIBUTIONS = {"uniform": 2, "quniform": 3, "loguniform": 2, "qloguniform": 3, "randint": 2,
                 "choice": None, "grid": None}
SWEEPS_ROOT = "duetto-runs/sweeps"


@dataclass
class SchedulerOptions:
    type: Literal["asha", "fifo"] = "asha"
    """asha = async successive halving (stops weak trials at rungs of reports); fifo = every trial runs to the end."""
    grace_period: int = 1
    """Reports a trial makes before ASHA may stop it."""
    reduction_factor: float = 2.0
    """ASHA keeps about 1/reduction_factor of the trials at each rung."""
    per_method: bool = True
    """One ASHA per method, so a GaLore trial is only ever cut for doing worse than other GaLore trials."""


@dataclass
class ResourceOptions:
    gpus_per_trial: float | None = None
    """GPUs for one trial's workers together; 0.25 lets four trials share one GPU. null = 1 when the cluster has GPUs, else 0."""
    cpus_per_trial: float = 1.0
    """CPUs for one trial's workers together (fractions let small CPU trials share cores)."""
    workers_per_trial: int = 1
    """Ray Train workers (DDP ranks) per trial; the trial's GPUs and CPUs are split evenly among them."""
    driver_cpus: float = 0.05
    """CPU reserved for each trial's Tune function, which only drives its TorchTrainer (Ray needs > 0)."""


@dataclass
class FailureOptions:
    trial_retries: int = 1
    """Times Tune re-runs a failed trial; the TorchTrainer inside resumes from its last checkpoint."""
    worker_retries: int | None = None
    """Ray Train restarts of a trial's worker group before the trial fails (null = the base trial's max_failures)."""
    fail_fast: bool = False
    """Stop the whole sweep at the first trial that fails for good (otherwise it is reported and the rest go on)."""


@dataclass
class SweepConfig:
    name: str = "sweep"
    """Sweep name: the Tune experiment name and, by default, the folder under duetto-runs/sweeps/."""
    trial_config: str = ""
    """Trial YAML every trial starts from (e.g. configs/qlora_study.yaml); empty = TrialConfig defaults."""
    base: dict[str, Any] = field(default_factory=dict)
    """TrialConfig keys applied on top of trial_config for every trial (nested or dotted keys)."""
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method (galore, qlora) its search space: TrialConfig key -> value or {uniform|loguniform|quniform|qloguniform|randint|choice|grid: [...]}."""
    num_samples: int | dict[str, int] = 4
    """Trials sampled per method (a mapping gives each method its own count); grid dimensions multiply it."""
    metric: Literal["rougeL", "bleu4", "eval_loss"] = "rougeL"
    """What ASHA and the best-trial choice optimise."""
    mode: Literal["max", "min"] | None = None
    """null = the metric's own direction (max for rougeL/bleu4, min for eval_loss)."""
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    resources: ResourceOptions = field(default_factory=ResourceOptions)
    failures: FailureOptions = field(default_factory=FailureOptions)
    packing: Literal["auto", "off", "qlora", "galore", "all"] = "auto"
    """auto | off | qlora | galore | all. auto = all when trials get a GPU share, for each method whose
    trials can pack (one worker per trial, gradient_accumulation_steps 1, QLoRA targets named rather than
    all-linear; resolve_packing), else off. off = every trial on its own Ray Train worker; qlora = the QLoRA trials
    that share a base (model, bits, sequence length, batch size, targets) train
    together in one forward/backward on one trial's GPU share (tune/packing.py); galore = the GaLore
    trials of one model, sequence length and batch size train together on stacked weights (each its own
    weights and optimizer: trainers/stacked_galore.py); all = both. Each packed trial is still its own
    Tune trial with its own reports, checkpoints and ASHA decisions; on a GPU, a pack's forward and
    backward replay as CUDA graphs unless the trials set cuda_graphs: false."""
    pack_size: int = 0
    """Most trials one pack trains at once; 0 = as many as its share of GPU memory holds (measured
    from its steps: see pack_memory_fraction; on CPU, no limit)."""
    pack_memory_fraction: float = 0.9
    """A pack admits another trial while base + measured memory per trial x trials stays within this
    fraction of its GPU share (gpus_per_trial of the GPU's memory; 1 GPU or more: the whole GPU)."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the cluster's GPUs (or CPUs) fit."""
    storage_path: str = ""
    """Folder of this sweep (trials, checkpoints, results); empty = duetto-runs/sweeps/<name>. Use an absolute path under `ray job submit`."""
    seed: int | None = 0
    """Seed of the random search, so a sweep file always samples the same trials (null = fresh each run)."""
    verbose: int = 1
    """Tune's console output: 0 silent, 1 the trial table, 2 also every reported result."""

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name: must be a plain folder name, got {self.name!r}")
        if not self.methods:
            raise ConfigError("methods: empty; give a search space for galore and/or qlora")
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(f"methods.{method}: unknown method (known: {', '.join(METHODS)})")
        counts = self.num_samples if isinstance(self.num_samples, dict) else {m: self.num_samples for m in self.methods}
        for method, n in counts.items():
            if method not in self.methods:
                raise ConfigError(f"num_samples.{method}: that method has no search space under methods")
            if n < 1:
                raise ConfigError(f"num_samples: must be >= 1 per method, got {n} for {method}")
        for method in self.methods:
            if method not in counts:
                raise ConfigError(f"num_samples.{method}: missing (num_samples is a mapping, so every method needs a count)")
        if self.mode is not None and self.mode != METRICS[self.metric]:
            better = "higher" if METRICS[self.metric] == "max" else "lower"
            raise ConfigError(f"mode: {self.metric} is better {better}, so mode {self.mode!r} would pick the worst trials")
        r = self.resources
        if r.gpus_per_trial is not None and r.gpus_per_trial < 0:
            raise ConfigError("resources.gpus_per_trial: must be >= 0")
        if r.cpus_per_trial <= 0 or r.driver_cpus <= 0:
            raise ConfigError("resources.cpus_per_trial and resources.driver_cpus: must be > 0")
        if r.workers_per_trial < 1:
            raise ConfigError("resources.workers_per_trial: must be >= 1")
        if r.gpus_per_trial:
            per_worker = r.gpus_per_trial / r.workers_per_trial
            if per_worker > 1 and per_worker != int(per_worker):
                raise ConfigError(
                    f"resources.gpus_per_trial: {r.gpus_per_trial} over {r.workers_per_trial} worker(s) is "
                    f"{per_worker} GPUs per worker; Ray only shares a GPU in fractions <= 1, above that it must be whole"
                )
        if self.max_concurrent_trials < 0:
            raise ConfigError("max_concurrent_trials: must be >= 0")
        if self.pack_size < 0:
            raise ConfigError("pack_size: must be >= 0 (0 = sized from GPU memory)")
        if not 0 < self.pack_memory_fraction <= 1:
            raise ConfigError(f"pack_memory_fraction: must be in (0, 1], got {self.pack_memory_fraction}")
        if self.scheduler.grace_period < 1:
            raise ConfigError("scheduler.grace_period: must be >= 1 report")
        if self.scheduler.reduction_factor <= 1:
            raise ConfigError("scheduler.reduction_factor: must be > 1")
        if self.failures.trial_retries < 0 or (self.failures.worker_retries or 0) < 0:
            raise ConfigError("failures.trial_retries / worker_retries: must be >= 0")

    # ----- derived values -------------------------------------------------------------------------

    @property
    def resolved_mode(self) -> str:
        return self.mode or METRICS[self.metric]

    def samples_for(self, method: str) -> int:
        return self.num_samples[method] if isinstance(self.num_samples, dict) else self.num_samples

    def sweep_dir(self) -> Path:
        """Absolute folder of this sweep (Tune's experiment directory)."""
        return Path(self.storage_path or f"{SWEEPS_ROOT}/{self.name}").expanduser().resolve()


# ----- loading -----------------------------------------------------------------------------------


def load_sweep(path: str | Path | None, overrides: list[str] | None = None) -> SweepConfig:
    """Sweep YAML + ``key=value`` overrides -> a fully checked SweepConfig (spaces and base included)."""
    sweep = load_config(SweepConfig, path, overrides)
    where = f"{path}: " if path else ""
    try:
        base = base_trial_dict(sweep)
        for method, space in sweep.methods.items():
            check_space(method, space, base)
        check_schedule(sweep, base)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return sweep


def base_trial_dict(sweep: SweepConfig) -> dict[str, Any]:
    """trial_config + base + the sweep's resources, as a validated TrialConfig dict with absolute paths.

    Paths become absolute here, in the driver, because Tune runs each trial with its own trial folder
    as the working directory (and `ray job submit` runs the driver in an uploaded copy of the repo).
    """
    data: dict[str, Any] = read_yaml(sweep.trial_config) if sweep.trial_config else {}
    if "method" in sweep.base:
        raise ConfigError("base.method: each trial's method is the methods section its space comes from; remove it")
    try:
        data = merge_dicts(data, nest(sweep.base))
    except ConfigError as e:
        raise ConfigError(f"base: {e}") from None
    r = sweep.resources
    scaling = data.setdefault("scaling", {})
    scaling["num_workers"] = r.workers_per_trial
    scaling["cpus_per_worker"] = r.cpus_per_trial / r.workers_per_trial
    if r.gpus_per_trial is None:  # 1 GPU per trial if the cluster has any: the trial decides use_gpu
        scaling["gpus_per_worker"] = 1.0 / r.workers_per_trial
    else:
        scaling["use_gpu"] = r.gpus_per_trial > 0
        if r.gpus_per_trial > 0:
            scaling["gpus_per_worker"] = r.gpus_per_trial / r.workers_per_trial
    if sweep.failures.worker_retries is not None:
        data["max_failures"] = sweep.failures.worker_retries
    data.pop("method", None)  # trial_config's own method: each trial takes its space's method instead
    try:
        cfg = from_dict(TrialConfig, data, prefix="base.")
    except ConfigError as e:
        src = f" (trial_config {sweep.trial_config})" if sweep.trial_config else ""
        raise ConfigError(f"{e}{src}") from None
    out = to_dict(cfg)
    for key in ("train", "test"):
        out["data"][key] = str(Path(out["data"][key]).expanduser().resolve())
    model = Path(out["model"]).expanduser()
    if model.exists():
        out["model"] = str(model.resolve())
    out.pop("method")
    return out


# ----- search spaces -----------------------------------------------------------------------------


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrialConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrialConfig) if dataclasses.is_dataclass(hints[f.name])}


def _leaf_fields(cls: type) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}


def resolve_key(method: str, key: str) -> str:
    """A space key -> its dotted TrialConfig key. ``rank`` under galore means ``galore.rank``."""
    where = f"methods.{method}.{key}"
    sections = _sections()
    top = _leaf_fields(TrialConfig)
    if key == "method":
        raise ConfigError(f"{where}: the method comes from the section name; remove this key")
    if "." in key:
        section, _, leaf = key.partition(".")
        if section not in sections or "." in leaf or leaf not in _leaf_fields(sections[section]):
            raise ConfigError(f"{where}: unknown key (no TrialConfig field {key})")
        if section in METHODS and section != method:
            raise ConfigError(f"{where}: {section}.* options belong to {section} trials, not {method}")
        return key
    if key in top:
        return key
    if method in sections and key in _leaf_fields(sections[method]):
        return f"{method}.{key}"
    known = sorted(top) + sorted(_leaf_fields(sections[method])) if method in sections else sorted(top)
    raise ConfigError(f"{where}: unknown key (known here: {', '.join(known)}, or a dotted TrialConfig key)")


def _distribution(method: str, key: str, value: Any) -> tuple[str, list] | None:
    """(name, args) when ``value`` is a distribution mapping, else None (a fixed value)."""
    if not isinstance(value, dict):
        return None
    where = f"methods.{method}.{key}"
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        names = ", ".join(DISTRIBUTIONS)
        raise ConfigError(f"{where}: a mapping here must be one distribution ({names}), got {value!r}")
    name, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {name} needs a non-empty list of arguments, got {args!r}")
    want = DISTRIBUTIONS[name]
    if want is not None:
        if len(args) != want:
            raise ConfigError(f"{where}: {name} takes {want} numbers, got {args!r}")
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: {name} takes numbers, got {args!r}")
        low, high = args[0], args[1]
        if not low < high:
            raise ConfigError(f"{where}: {name} needs low < high, got {args!r}")
        if name.endswith("loguniform") and low <= 0:
            raise ConfigError(f"{where}: {name} needs low > 0, got {args!r}")
        if name == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}: randint takes integers [low, high) (high exclusive), got {args!r}")
    return name, args


def _candidates(name: str, args: list) -> list:
    """Values a distribution can produce at its edges (continuous ones sample floats)."""
    if name in ("choice", "grid"):
        return list(args)
    if name == "randint":
        return [args[0], args[1] - 1]
    return [float(args[0]), float(args[1])]


def check_space(method: str, space: dict[str, Any], base: dict[str, Any]) -> None:
    """Fail fast: every key known, every distribution well formed, and every edge value a valid trial."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"methods.{method}: empty search space; give at least one key, e.g. learning_rate: {{loguniform: [1e-6, 1e-4]}}")
    fixed, trials = _edge_trials(method, space)
    for values in trials:
        data = merge_dicts(base, nest({**fixed, **values}))
        data["method"] = method
        try:
            from_dict(TrialConfig, data)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"methods.{method}: a trial with {shown or 'its fixed values'} is invalid: {e}") from None


def _edge_trials(method: str, space: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the space's fixed values, the sampled values of trials that reach every edge value of each
    distribution), by dotted key: the trials a check of the whole space needs to look at."""
    fixed: dict[str, Any] = {}
    edges: dict[str, list] = {}
    for key, value in space.items():
        dotted = resolve_key(method, str(key))
        dist = _distribution(method, str(key), value)
        if dist is None:
            fixed[dotted] = value
        else:
            edges[dotted] = _candidates(*dist)
    start = {k: v[0] for k, v in edges.items()}
    return fixed, [start] + [{**start, k: v} for k, vals in edges.items() for v in vals[1:]]


def check_schedule(sweep: SweepConfig, base: dict[str, Any]) -> None:
    """ASHA can only cut trials on a metric it sees at every report, and it needs >= 2 reports."""
    if sweep.scheduler.type != "asha":
        return
    if sweep.metric in ("rougeL", "bleu4") and base.get("interim_eval_examples", 0) <= 0:
        raise ConfigError(
            f"metric: {sweep.metric} is only reported at the end unless base.interim_eval_examples > 0, "
            "so ASHA could never compare trials; set it (e.g. 16) or use metric: eval_loss"
        )
    every, max_steps, epochs = base.get("report_every_steps", 0), base.get("max_steps", -1), base.get("epochs", 1)
    one_report = (max_steps > 0 and (every <= 0 or every >= max_steps)) or (max_steps == -1 and every <= 0 and epochs < 2)
    if one_report:
        raise ConfigError(
            f"base.report_every_steps: with report_every_steps={every}, max_steps={max_steps}, epochs={epochs} a trial "
            "reports once, so ASHA cannot stop anything early; report more often or set scheduler.type: fifo"
        )


def space_entries(sweep: SweepConfig) -> list[dict[str, Any]]:
    """One entry per trial to sample: {"method": m, dotted key: value or Tune domain}.

    Both methods go into ONE Tune grid over these entries (a method's entry repeated num_samples times,
    each drawn independently), so one Tuner, one scheduler and one results table cover both.
    """
    from ray import tune

    makers = {name: getattr(tune, "grid_search" if name == "grid" else name) for name in DISTRIBUTIONS}
    entries = []
    for method, space in sweep.methods.items():
        entry: dict[str, Any] = {"method": method}
        for key, value in space.items():
            dist = _distribution(method, str(key), value)
            dotted = resolve_key(method, str(key))
            if dist is None:
                entry[dotted] = value
            else:
                name, args = dist
                entry[dotted] = makers[name](args) if name in ("choice", "grid") else makers[name](*args)
        entries.extend(dict(entry) for _ in range(sweep.samples_for(method)))
    return entries


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    return {"trial": tune.grid_search(space_entries(sweep))}


def space_keys(sweep: SweepConfig) -> dict[str, list[str]]:
    """method -> the dotted keys its space sets (the hyper-parameter columns of the results)."""
    return {m: [resolve_key(m, str(k)) for k in space] for m, space in sweep.methods.items()}


def trial_config(base: dict[str, Any], params: dict[str, Any], output_dir: str) -> TrialConfig:
    """The TrialConfig of one Tune trial: base + its sampled params, writing into its own folder."""
    data = merge_dicts(base, nest({k: v for k, v in params.items() if k != "method"}))
    data["method"] = params["method"]
    data["output_dir"] = output_dir
    return from_dict(TrialConfig, data)


# ----- resources against the cluster -------------------------------------------------------------


def gpus_per_trial(sweep: SweepConfig, cluster: dict[str, float]) -> float:
    g = sweep.resources.gpus_per_trial
    return (1.0 if cluster.get("GPU", 0) > 0 else 0.0) if g is None else g


def check_resources(sweep: SweepConfig, cluster: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """Fail fast when no trial could ever be placed; return how many trials fit at once.

    ``cluster`` is ``ray.cluster_resources()``, ``nodes`` the resources of each alive node: a worker's
    share must fit on one node, a trial's total on the cluster.
    """
    r = sweep.resources
    gpus = gpus_per_trial(sweep, cluster)
    cpus = r.cpus_per_trial + r.driver_cpus
    total_cpu, total_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus > total_cpu + 1e-9:
        raise ConfigError(
            f"resources.cpus_per_trial: a trial needs {r.cpus_per_trial} + driver_cpus {r.driver_cpus} = {cpus:g} CPUs "
            f"but the Ray cluster has {total_cpu:g}"
        )
    if gpus > 0 and total_gpu <= 0:
        raise ConfigError(f"resources.gpus_per_trial: {gpus:g} GPUs per trial, but the Ray cluster has no GPUs (set 0 to train on CPU)")
    if gpus > total_gpu + 1e-9:
        raise ConfigError(f"resources.gpus_per_trial: {gpus:g} GPUs per trial, but the Ray cluster has {total_gpu:g}")
    per_worker_cpu = r.cpus_per_trial / r.workers_per_trial
    per_worker_gpu = gpus / r.workers_per_trial
    if nodes and not any(n.get("CPU", 0) + 1e-9 >= per_worker_cpu and n.get("GPU", 0) + 1e-9 >= per_worker_gpu for n in nodes):
        raise ConfigError(
            f"resources: one worker needs {per_worker_cpu:g} CPU and {per_worker_gpu:g} GPU on a single node, "
            "and no node of the Ray cluster has that much"
        )
    fits = math.floor(total_cpu / cpus + 1e-9)
    if gpus > 0:
        fits = min(fits, math.floor(total_gpu / gpus + 1e-9))
    return max(1, fits)


#: Most packed trials a sweep runs at once (each a client of its pack actor: tune/packing.py).
MAX_PACK_CLIENTS = 200


def concurrent_trials(sweep: SweepConfig, fits: int) -> int:
    """Trials Tune runs at once: what the resources fit (``fits``), plus, when trials are packed, every
    packed trial up to MAX_PACK_CLIENTS (a packed trial holds only its driver's CPUs; its pack decides
    when it joins); max_concurrent_trials instead when set (packed: at most fits + MAX_PACK_CLIENTS)."""
    packed = [m for m in packed_methods(sweep.packing) if m in sweep.methods]
    if packed:
        n = sweep.max_concurrent_trials or fits + sum(trials_of(sweep, m) for m in packed)
        return min(n, fits + MAX_PACK_CLIENTS)
    return sweep.max_concurrent_trials or fits


def packed_methods(packing: str) -> tuple[str, ...]:
    """The methods whose trials a sweep's ``packing`` setting packs (``auto``: see resolve_packing)."""
    return {"off": (), "auto": (), "qlora": ("qlora",), "galore": ("galore",), "all": ("qlora", "galore")}[packing]


def max_packs(sweep: SweepConfig, method: str) -> int:
    """The most packs a method's trials can need: one per combination of the values its space gives the
    settings a pack's trials share (trainers/pack_groups.py SHARED), at most one per trial."""
    trials = trials_of(sweep, method)
    packs = 1
    for key, value in sweep.methods.get(method, {}).items():
        dist = _distribution(method, str(key), value)
        if dist is None or resolve_key(method, str(key)) not in SHARED[method]:
            continue
        name, args = dist
        packs *= len({repr(a) for a in args}) if name in ("choice", "grid") else trials
    return min(packs, trials)


def packs_overflow(sweep: SweepConfig, packing: str, gpus: float, cluster: dict[str, float]) -> str:
    """Why the packs of ``packing`` would not fit the cluster ("" when they do). A pack actor holds one
    trial's share (``gpus`` GPU, cpus_per_trial CPUs) until the sweep ends, and a method left unpacked
    needs one more share free to run its trials: packs that took the whole cluster would leave some
    trials waiting forever."""
    packed = [m for m in packed_methods(packing) if m in sweep.methods]
    packs = sum(max_packs(sweep, m) for m in packed)
    if not packs:
        return ""
    shares = packs + any(m not in packed for m in sweep.methods)
    for resource, share in (("GPU", gpus), ("CPU", sweep.resources.cpus_per_trial)):
        if share > 0 and shares * share > cluster.get(resource, 0.0) + 1e-9:
            return (f"{packs} pack(s) of {share:g} {resource}{' and one unpacked trial' if shares > packs else ''} need "
                    f"{shares * share:g} {resource}s, the cluster has {cluster.get(resource, 0.0):g}")
    return ""


def resolve_packing(sweep: SweepConfig, base: dict[str, Any], gpus: float, cluster: dict[str, float]) -> tuple[str, str]:
    """(the ``packing`` a sweep runs with, why not more, for ``auto``). ``auto`` packs when a trial gets
    a GPU share (``gpus``: gpus_per_trial on this cluster), each method whose trials can pack, while
    the packs fit the cluster (packs_overflow): on a GPU a pack's shared steps train several trials
    for about the cost of one, and on CPU they save only the Ray Train workers' start. A set value
    stays as it is, unless its packs would not fit: then it is an error."""
    if sweep.packing != "auto":
        overflow = packs_overflow(sweep, sweep.packing, gpus, cluster)
        if overflow:
            raise ConfigError(f"packing: {sweep.packing}: {overflow}; lower resources.gpus_per_trial / cpus_per_trial or set packing: off")
        return sweep.packing, ""
    if gpus <= 0:
        return "off", "no GPU per trial"
    if sweep.resources.workers_per_trial != 1:
        return "off", f"{sweep.resources.workers_per_trial} workers per trial (a pack trains on one)"
    methods, why = [], []
    for method in PACKABLE:
        if method not in sweep.methods:
            continue
        fixed, trials = _edge_trials(method, sweep.methods[method])
        reasons = {unpackable(trial_config(base, {**fixed, **values, "method": method}, "")) for values in trials} - {""}
        if reasons:
            why.append(f"{method}: {'; '.join(sorted(reasons))}")
        else:
            methods.append(method)
    packing = "all" if len(methods) == len(PACKABLE) else (methods[0] if methods else "off")
    overflow = packs_overflow(sweep, packing, gpus, cluster)
    if overflow:
        packing, why = "off", [*why, overflow]
    return packing, "; ".join(why)


def trials_of(sweep: SweepConfig, method: str) -> int:
    """Trials of one method (grid dimensions multiply its samples)."""
    if method not in sweep.methods:
        return 0
    dists = [_distribution(method, str(key), value) for key, value in sweep.methods[method].items()]
    return math.prod(len(d[1]) for d in dists if d and d[0] == "grid") * sweep.samples_for(method)


def total_trials(sweep: SweepConfig) -> int:
    """Trials the sweep will run (grid dimensions multiply a method's samples)."""
    return sum(trials_of(sweep, method) for method in sweep.methods)
