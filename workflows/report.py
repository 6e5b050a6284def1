"""`duetto report`: the study's table done properly — baseline, QLoRA, GaLore and the ensemble on one
fixed test split, same prompts and decoding, 95% bootstrap intervals, paired tests, resources, examples.

Every system decodes through ``duetto.serve.ensemble`` (the code the HTTP endpoint runs): single
models answer greedily (k=1), the ensemble samples k from the QLoRA model and lets GaLore re-rank.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duetto.config import ConfigError, dump_yaml, to_dict
from duetto.serve.config import DecodingOptions
from duetto.serve.selection import Mode
from duetto.workflows.render import fmt_ci, render_markdown


@dataclass
class EnsembleSettings:
    k: int = 4
    """Candidates the QLoRA generator samples per prompt."""
    temperature: float = 0.7
    """Sampling temperature of the candidates."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    greedy_candidate: bool = False
    """The first of the k candidates is the generator's greedy answer, the others sampled (as in `duetto serve`)."""
    mode: Mode = "reranker"
    """Choice rule, as in `duetto serve` (ensemble.mode there); with validation rows, the rule fitted there."""
    weight: float = 0.5
    """mix: the generator log-prob's weight; pmi: the prior's (as in `duetto serve`)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Mode combined: each feature's weight (as in `duetto serve`)."""
    compare_k: list[int] = field(default_factory=list)
    """Also score the ensemble's mode on the first n of the k candidates, for each n here (n < k), with
    the model time per request of n candidates (timed on one batch of rows each): what more candidates
    buy. E.g. k: 16, compare_k: [4, 8]."""


@dataclass
class ValidationSettings:
    train: str = ""
    """A unified train.jsonl whose last `val_size` rows the trials held out (data.val_size of the sweep):
    the ensemble's candidates there fix each selection mode's weights and the default mode before any
    test row is decoded. Empty: the configured ensemble.mode and weights are used as they are."""
    val_size: float = 0.15
    """The held-out share (or count) of `train`, as the sweep's data.val_size."""
    limit_train: int = 0
    """The trials' data.limit_train: they held out the tail of the first N rows of `train` (0 = all)."""
    num_examples: int = 0
    """First N validation rows (0 = all)."""
    greedy_candidate: bool = True
    """Also choose ensemble.greedy_candidate here: the validation rows get k + 1 candidates (the greedy
    answer and k samples), the rule is fitted on both k-candidate pools (k samples; the greedy answer
    and k - 1 samples), and the pool whose rule cross-validates better decides how the test rows are
    decoded. False: ensemble.greedy_candidate is used as configured."""


@dataclass
class ReportConfig:
    baseline: str = "smollm2-135m-instruct"
    """Base model (id, path or fetch name): the Baseline row."""
    qlora: str = ""
    """A QLoRA trial's output dir (or its model/ dir)."""
    galore: str = ""
    """A GaLore trial's output dir (or its model/ dir)."""
    sweep: str = ""
    """A sweep storage dir: its best.json names the QLoRA and GaLore trials (overrides qlora/galore)."""
    extra: dict[str, str] = field(default_factory=dict)
    """More single-model rows: label -> trial dir (e.g. the sweep's best settings)."""
    test: str = "duetto-runs/data/test.jsonl"
    """Unified test split (the same file every row is scored on)."""
    num_examples: int = 0
    """First N test rows (0 = all)."""
    template: str = "study"
    """Prompt template for the baseline (trials use their own)."""
    max_new_tokens: int = 64
    """Generation budget per answer."""
    batch_size: int = 32
    """Prompts per generate call."""
    seed: int = 0
    """Sampling and bootstrap seed."""
    bootstrap: int = 1000
    """Bootstrap resamples."""
    ensemble: EnsembleSettings = field(default_factory=EnsembleSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    """Static-shape decoding of every model, as `duetto serve` decodes (its decoding.* keys): on by default on GPU."""
    out: str = "docs/results/study"
    """Folder for report.md, report.json and outputs.jsonl."""
    device: str = "auto"
    """cuda | cpu | auto."""

    def validate(self) -> None:
        from duetto.serve.selection import check_mode

        if not self.sweep and not (self.qlora and self.galore):
            raise ConfigError("qlora / galore: name both trials, or a sweep dir")
        e = self.ensemble
        if e.k < 1:
            raise ConfigError("ensemble.k: must be >= 1")
        if any(not 1 <= n <= e.k for n in e.compare_k):
            raise ConfigError(f"ensemble.compare_k: each count must be in 1..ensemble.k ({e.k}), got {e.compare_k}")
        if not 0.0 <= e.weight <= 1.0:
            raise ConfigError("ensemble.weight: must be in [0, 1]")
        if e.weights or e.mode == "combined":
            try:
                check_mode("combined", e.weights)
            except ValueError as err:
                raise ConfigError(f"ensemble.{err}") from None
        if self.validation.train and e.mode == "reranker-greedy":
            raise ConfigError("validation.train fits the rule that picks among sampled candidates; "
                              "ensemble.mode reranker-greedy samples none")  # fmt: skip


# ---------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    # a 365-example report takes minutes on a GPU: say where it is
    print(f"[duetto report {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _decode(lm, rows: list[dict], cfg: ReportConfig, *, generator=None, reranker=None, ensemble: bool = False,
            selection: dict | None = None, k: int | None = None, greedy_candidate: bool | None = None):  # fmt: skip
    """Answers for every row, in batches; returns (texts, seconds per example, extra per-row info).
    The ensemble computes every candidate feature whatever its mode (``selection``: mode, weight,
    weights), so every mode can be compared on the same candidates; its info[0] also holds each
    step's milliseconds per request (``step_ms``). ``k`` and ``greedy_candidate`` override the
    ensemble settings'."""
    from duetto.serve.ensemble import EnsembleRequest, ensemble_generate, sample_requests
    from duetto.serve.selection import FEATURES

    texts, info = [], []
    step_totals: dict[str, float] = {}
    keys = ("text", "generator_logprob", "reranker_score", "prior_score", "consensus")
    t0 = time.perf_counter()
    e = cfg.ensemble
    k = e.k if k is None else k
    greedy = e.greedy_candidate if greedy_candidate is None else greedy_candidate
    for i in range(0, len(rows), cfg.batch_size):
        chunk = rows[i : i + cfg.batch_size]
        reqs = [EnsembleRequest(instruction=r["instruction"], input=r.get("input", ""), k=k if ensemble else 1,
                                max_new_tokens=cfg.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                                greedy_candidate=ensemble and greedy)
                for r in chunk]
        if ensemble:
            import torch

            torch.manual_seed(cfg.seed + i)
            sel = selection or {"mode": e.mode, "weight": e.weight, "weights": e.weights}
            results = ensemble_generate(generator, reranker, reqs, mode=sel["mode"], weight=sel["weight"],
                                        weights=sel["weights"] or None, features=FEATURES)  # fmt: skip
            for step, ms in results[0].timings_ms.items():  # one batch: the same timings for each result
                if step in ("generate", "score", "prior", "consensus"):
                    step_totals[step] = step_totals.get(step, 0.0) + ms
            for res in results:
                texts.append(res.response)
                info.append({"chosen_index": res.chosen_index,
                             "candidates": [{key: getattr(c, key) for key in keys} for c in res.candidates]})
        else:
            for cands in sample_requests(lm, reqs, greedy=True):
                texts.append(cands[0].text)
                info.append({})
    _log(f"{'ensemble' if ensemble else lm.name}: {len(rows)} examples in {time.perf_counter() - t0:.0f} s")
    if info and ensemble:
        info[0]["step_ms"] = {step: ms / len(rows) for step, ms in step_totals.items()}
    return texts, (time.perf_counter() - t0) / max(1, len(rows)), info


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "ray", "sacrebleu", "rouge-score", "galore-torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:  # a missing optional library is reported, not fatal
            out[dist] = "not installed"
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        out["device"] = "?"
    return out


#: What each trial's config.yaml says about how it was trained (shown in the report's set-up).
TRIAL_KEYS = ("method", "model", "data", "learning_rate", "epochs", "max_steps", "batch_size", "max_seq_len",
              "seed", "template", "gradient_checkpointing", "precision")  # fmt: skip
METHOD_KEYS = {"qlora": ("bits", "r", "alpha", "dropout", "target_modules", "upcast_fp32"),
               "galore": ("rank", "update_proj_gap", "scale", "layerwise", "target_modules")}  # fmt: skip


def _provenance(test_path: str, specs: dict[str, Any]) -> dict[str, Any]:
    """The test file (sha256, the split's manifest beside it) and each trial's training settings."""
    import yaml

    from duetto.files import file_sha256

    test = Path(test_path)
    data: dict[str, Any] = {"test": str(test), "test_sha256": file_sha256(test)}
    manifest = test.parent / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{manifest}: not valid JSON ({e})") from None
        data["split_seed"] = m.get("seed")
        data["sources"] = [f"{s.get('kind')}: {s.get('path')}" for s in (m.get("config") or {}).get("sources", [])]
        data["manifest"] = str(manifest)
    trials = {}
    for name, spec in specs.items():
        cfg_file = Path(spec.trial_dir or "", "config.yaml")
        if not (spec.trial_dir and cfg_file.is_file()):
            continue
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{cfg_file}: expected a trial config mapping, got {type(cfg).__name__}")
        entry = {k: cfg.get(k) for k in TRIAL_KEYS if k in cfg}
        entry.update({f"{cfg.get('method')}.{k}": (cfg.get(cfg.get("method")) or {}).get(k)
                      for k in METHOD_KEYS.get(cfg.get("method"), ())})  # fmt: skip
        entry["trial_dir"] = spec.trial_dir
        trials[name] = entry
    return {"data": data, "trials": trials}


def _validation_rows(cfg: ReportConfig) -> list[dict]:
    """The rows the sweep held out of train.jsonl (the same split function the trials use)."""
    from duetto.trainers.trial_data import read_rows, split_validation

    v = cfg.validation
    _, held = split_validation(read_rows(v.train, v.limit_train, key="validation.train"), v.val_size, v.train)
    return held[: v.num_examples] if v.num_examples > 0 else held


def _modes_to_compare(cfg: ReportConfig, selection: dict | None) -> dict[str, dict]:
    """Every mode with its weights: those fitted on validation rows, else the configured ones."""
    from duetto.serve.selection import fitted_params

    if selection:
        return {m: fitted_params(f) for m, f in selection["modes"].items()}
    e = cfg.ensemble
    modes = {"reranker": {}, "generator": {}, "mix": {"weight": e.weight}, "consensus": {}, "pmi": {"weight": e.weight}}
    if e.weights:
        modes["combined"] = {"weights": dict(e.weights)}
    return modes


def build_report(cfg: ReportConfig, command: str = "") -> dict[str, Any]:
    import torch

    from duetto.data.unify import read_jsonl
    from duetto.serve.loading import inspect_saved, models_from_sweep
    from duetto.trainers.methods import quiet_int8_cast_warning
    from duetto.workflows.stats import METRICS, bootstrap_ci, paired_bootstrap

    quiet_int8_cast_warning()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    qlora_src, galore_src = (models_from_sweep(cfg.sweep) if cfg.sweep else (cfg.qlora, cfg.galore))
    rows = read_jsonl(cfg.test)
    rows = rows[: cfg.num_examples] if cfg.num_examples > 0 else rows
    refs = [r["response"] for r in rows]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # read before minutes of decoding, so a bad manifest or trial config fails first
    specs = {"QLoRA": inspect_saved(qlora_src), "GaLore": inspect_saved(galore_src),
             **{label: inspect_saved(src) for label, src in cfg.extra.items()}}
    provenance = _provenance(cfg.test, specs)
    val_rows = _validation_rows(cfg) if cfg.validation.train else None
    from duetto.serve.engine import load_hf

    def load(src: str, template: str = "", scores: bool = False):
        """As a Serve replica loads and warms a model, so the latency columns time decoding alone."""
        engine = load_hf(src, template, device=device, dtype="auto", quantize="auto", adapter="auto", context_cap=0,
                         allow_pickle=False, decoding=cfg.decoding)  # fmt: skip
        engine.warm_up(scoring=scores)  # only the reranker scores: the others skip compiling it
        return engine.lm

    q_lm, g_lm = load(qlora_src), load(galore_src, scores=True)
    e = cfg.ensemble
    chosen = {"mode": e.mode, "weight": e.weight, "weights": dict(e.weights)}
    greedy = e.greedy_candidate
    selection = None
    if val_rows is not None:  # the rule is fixed before any test row is decoded
        from duetto.workflows.selection_report import fit_selection, fit_selection_and_greedy

        # sampled and scored with every feature whatever the mode; the fit then chooses among all modes
        sampling = {"mode": "reranker", "weight": e.weight, "weights": {}}
        v = cfg.validation
        both = v.greedy_candidate
        _, _, val_info = _decode(None, val_rows, cfg, generator=q_lm, reranker=g_lm, ensemble=True, selection=sampling,
                                 k=e.k + 1 if both else e.k, greedy_candidate=both or greedy)  # fmt: skip
        val = [{"reference": r["response"], "ensemble_candidates": i["candidates"]} for r, i in zip(val_rows, val_info)]
        selection = fit_selection_and_greedy(val, e.k) if both else fit_selection(val)
        greedy = selection.get("greedy_candidate", greedy)
        selection["source"] = f"{v.train}" + (f", first {v.limit_train}" if v.limit_train else "") + f", last {v.val_size:g}"
        chosen = {"mode": selection["chosen"], "weight": selection["params"].get("weight", e.weight),
                  "weights": selection["params"].get("weights", {})}  # fmt: skip
        _log(f"validation ({len(val_rows)} rows): mode {chosen['mode']} {selection['params']}, greedy_candidate {greedy}")
    systems: dict[str, dict[str, Any]] = {}
    base_lm = load(cfg.baseline, cfg.template)  # loaded as the endpoint loads it
    texts, lat, _ = _decode(base_lm, rows, cfg)
    systems["Baseline"] = {"texts": texts, "latency_s": lat, "source": cfg.baseline}
    del base_lm

    def single(name: str, lm) -> None:
        texts, lat, _ = _decode(lm, rows, cfg)
        systems[name] = {"texts": texts, "latency_s": lat, "source": specs[name].trial_dir or specs[name].path}

    single("QLoRA", q_lm)
    single("GaLore", g_lm)
    texts, lat, info = _decode(None, rows, cfg, generator=q_lm, reranker=g_lm, ensemble=True, selection=chosen,
                               greedy_candidate=greedy)  # fmt: skip
    systems[f"Ensemble (QLoRA top-{e.k}{', greedy first' if greedy else ''}, mode {chosen['mode']})"] = {
        "texts": texts, "latency_s": lat, "info": info, "source": f"{qlora_src} + {galore_src}"}
    for label, src in cfg.extra.items():
        single(label, load(src))

    n = cfg.bootstrap
    t0 = time.perf_counter()
    stats = {name: {m: stat(s["texts"], refs) for m, (stat, _) in METRICS.items()} for name, s in systems.items()}
    for name, s in systems.items():
        for m, (_, from_sums) in METRICS.items():
            s[m] = bootstrap_ci(stats[name][m], from_sums, n_resamples=n, seed=cfg.seed)
    better = max(("QLoRA", "GaLore"), key=lambda k: systems[k]["rougeL"][0])
    ens_name = next(k for k in systems if k.startswith("Ensemble"))
    pairs = [("Baseline", name) for name in systems if name != "Baseline"] + [(better, ens_name)]
    tests = [{"a": a, "b": b, "metric": m,
              **paired_bootstrap(stats[a][m], stats[b][m], from_sums, n_resamples=n, seed=cfg.seed)}
             for a, b in pairs for m, (_, from_sums) in METRICS.items()]  # fmt: skip
    _log(f"scored {len(systems)} systems, {len(tests)} paired tests, {n} resamples in {time.perf_counter() - t0:.1f} s")

    resources = {}
    for name in ("QLoRA", "GaLore"):
        mfile = Path(specs[name].trial_dir or "", "metrics.json")
        resources[name] = json.loads(mfile.read_text()) if specs[name].trial_dir and mfile.exists() else {}

    records = []
    for i, row in enumerate(rows):
        ens_info = systems[ens_name]["info"][i]
        records.append({"instruction": row["instruction"], "input": row.get("input", ""), "reference": row["response"],
                        **{name: s["texts"][i] for name, s in systems.items()},
                        "ensemble_candidates": ens_info.get("candidates"),
                        "ensemble_chosen_index": ens_info.get("chosen_index")})  # fmt: skip
    with open(out / "outputs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    from duetto.workflows.selection_report import selection_table

    methods = selection_table(records, modes=_modes_to_compare(cfg, selection), returned_mode=chosen["mode"],
                              best_single=(better, systems[better]["texts"]),
                              per_request_ms=systems[ens_name]["info"][0].get("step_ms") if rows else None,
                              n_resamples=n, seed=cfg.seed)  # fmt: skip
    counts = None
    if e.compare_k and rows:
        from duetto.workflows.selection_report import count_table

        timed = {e.k: systems[ens_name]["info"][0].get("step_ms") or {}}
        for count in sorted(set(e.compare_k) - {e.k}):  # each count's own sampling and scoring time, on one batch
            timed[count] = _decode(None, rows[: cfg.batch_size], cfg, generator=q_lm, reranker=g_lm, ensemble=True,
                                   selection=chosen, k=count, greedy_candidate=greedy)[2][0].get("step_ms") or {}  # fmt: skip
        params = {"weight": chosen["weight"], "weights": chosen["weights"] or None}
        counts = count_table(records, mode=chosen["mode"], params=params, counts=e.compare_k,
                             best_single=(better, systems[better]["texts"]), per_request_ms=timed, n_resamples=n,
                             seed=cfg.seed)  # fmt: skip
    report = {
        "config": to_dict(cfg),
        "command": command,
        "num_examples": len(rows),
        "systems": {k: {kk: vv for kk, vv in v.items() if kk not in ("texts", "info")} for k, v in systems.items()},
        "tests": tests,
        "selection": selection or {"fitted_on": None, "chosen": chosen["mode"]},
        "selection_methods": methods,
        "candidate_counts": counts,
        "resources": resources,
        "provenance": provenance,
        "versions": _versions(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report, rows, systems))
    dump_yaml(cfg, out / "report_config.yaml")
    return report


# ---------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    from duetto.config import add_config_arguments, add_config_flags

    add_config_arguments(parser, "configs/report_study.yaml")
    add_config_flags(parser, ReportConfig, ["sweep"])


def run(args: argparse.Namespace) -> int:
    from duetto.config import config_from_arguments

    cfg = config_from_arguments(ReportConfig, args)
    if cfg is None:
        return 0
    report = build_report(cfg, command="duetto report " + " ".join(sys.argv[2:]))
    for name, s in report["systems"].items():
        print(f"{name:45} BLEU-4 {fmt_ci(*s['bleu4'], 2):24} ROUGE-L {fmt_ci(*s['rougeL'], 3)}")
    print(f"wrote {Path(cfg.out) / 'report.md'}")
    return 0
