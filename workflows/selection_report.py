"""Every way of choosing among the ensemble's candidates, compared on the same stored candidates.

``fit_selection`` fixes each mode's weights, and the default mode, on validation rows (the sweep's
split held out of train.jsonl), and ``fit_selection_and_greedy`` also whether the generator's greedy
answer is one of the candidates; ``selection_table`` then scores every mode on the test rows' stored
candidates: BLEU-4 and ROUGE-L with bootstrap intervals, paired tests against the best single model
and against a random pick, the oracle (the best candidate against the reference, a bound no chooser
passes) and each mode's model time per request; ``count_table`` scores the returned mode on the first
n of each prompt's candidates, for several n: what more candidates buy, and what they cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from duetto.serve.selection import (
    FEATURES,
    FITTED_MODES,
    choose,
    consensus_scores,
    features_for,
    fit_modes,
    fitted_params,
    has_features,
)
from duetto.trainers.inference import Candidate

RANDOM_PICK = "any one candidate (a random pick)"
ORACLE = "the best candidate against the reference (upper bound)"


def stored_candidates(rows: Sequence[dict]) -> list[list[Candidate]]:
    """The candidates of ``outputs.jsonl``-style rows (``ensemble_candidates``), consensus filled in."""
    out = []
    for r in rows:
        cs = [Candidate(**{k: c.get(k) for k in ("text", "generator_logprob", "reranker_score", "prior_score",
                                                  "consensus")}) for c in r["ensemble_candidates"]]  # fmt: skip
        if any(c.consensus is None for c in cs):
            for c, s in zip(cs, consensus_scores([c.text for c in cs])):
                c.consensus = s
        out.append(cs)
    return out


def candidate_rouge(cands: Sequence[Sequence[Candidate]], references: Sequence[str]) -> list[list[float]]:
    from duetto.trainers.evaluate import rouge_l_scores

    flat = iter(rouge_l_scores([c.text for cs in cands for c in cs], [r for r, cs in zip(references, cands) for _ in cs]))
    return [[next(flat) for _ in cs] for cs in cands]


def cross_validated(cands: Sequence[Sequence[Candidate]], util: Sequence[Sequence[float]], folds: int = 5) -> dict:
    """Each mode's mean ROUGE-L on rows its weights were not fitted on: the rows are dealt into
    ``folds`` folds, and each fold's picks use the weights fitted on the others. A mode with free
    weights always looks better on the rows it was fitted on (on random scores, combined's 1,295
    weight settings reach 0.59 where every rule is worth 0.50), so the default mode is chosen on this."""
    n = len(cands)
    folds = min(folds, n)
    if folds < 2:
        return {}
    picked: dict[str, list[float]] = {}
    for f in range(folds):
        fit_rows = [i for i in range(n) if i % folds != f]
        fitted = fit_modes([cands[i] for i in fit_rows], [util[i] for i in fit_rows], FITTED_MODES)
        for mode, p in fitted.items():
            for i in range(f, n, folds):
                j = choose(cands[i], mode, p.get("weight", 0.5), p.get("weights"))
                picked.setdefault(mode, []).append(util[i][j])
    return {m: sum(v) / len(v) for m, v in picked.items() if len(v) == n}


def fit_selection(rows: Sequence[dict], folds: int = 5) -> dict:
    """Each mode's weights (fitted on all the rows) and the default mode (the best cross-validated
    ROUGE-L F over ``folds`` folds), from validation rows with stored candidates: ``{"rows", "k",
    "modes": {mode: {params, mean_rougeL, cv_rougeL}}, "chosen", "params"}``."""
    rows = [r for r in rows if r.get("ensemble_candidates")]
    if not rows:
        raise ValueError("fit_selection: no rows with candidates")
    cands = stored_candidates(rows)
    util = candidate_rouge(cands, [r["reference"] for r in rows])
    fitted = fit_modes(cands, util, FITTED_MODES)
    cv = cross_validated(cands, util, folds)
    for mode, f in fitted.items():
        f["cv_rougeL"] = cv.get(mode, f["mean_rougeL"])
    chosen = max(fitted, key=lambda m: (fitted[m]["cv_rougeL"], -FITTED_MODES.index(m)))
    return {"rows": len(rows), "k": max(len(cs) for cs in cands), "folds": min(folds, len(rows)), "modes": fitted,
            "chosen": chosen, "params": fitted_params(fitted[chosen])}  # fmt: skip


def greedy_pools(rows: Sequence[dict], k: int) -> dict[bool, list[dict]]:
    """Rows decoded with ``greedy_candidate`` and k + 1 candidates (the greedy answer, then k samples),
    as each setting of ``greedy_candidate`` would decode them with k: False keeps the k samples, True the
    greedy answer and the first k - 1 samples (samples are exchangeable: the first k - 1 of k are k - 1
    samples). Consensus is recomputed within each pool."""
    pools: dict[bool, list[dict]] = {}
    for greedy in (False, True):
        pick = slice(0, k) if greedy else slice(1, k + 1)
        pools[greedy] = [{**r, "ensemble_candidates": [{key: v for key, v in c.items() if key != "consensus"}
                                                        for c in r["ensemble_candidates"][pick]]}
                         for r in rows]  # fmt: skip
    return pools


def fit_selection_and_greedy(rows: Sequence[dict], k: int, folds: int = 5) -> dict:
    """``fit_selection`` on both pools of ``greedy_pools``; the one whose chosen mode cross-validates
    better (ties: without the greedy answer) is returned, with ``greedy_candidate`` set and both pools'
    choices under ``pools``."""
    fits = {greedy: fit_selection(pool, folds) for greedy, pool in greedy_pools(rows, k).items()}
    cv = {greedy: f["modes"][f["chosen"]]["cv_rougeL"] for greedy, f in fits.items()}
    greedy = cv[True] > cv[False]
    return {**fits[greedy], "greedy_candidate": greedy,
            "pools": {str(g).lower(): {"chosen": f["chosen"], "cv_rougeL": cv[g]} for g, f in fits.items()}}


def step_ms(mode: str, params: Mapping[str, Any], per_request_ms: Mapping[str, float]) -> float | None:
    """Model and selection time per request of ``mode``: sampling, plus the scoring passes its features need."""
    steps = ["generate"] + [s for f, s in (("reranker", "score"), ("prior", "prior"), ("consensus", "consensus"))
                            if f in features_for(mode, params.get("weights"))]  # fmt: skip
    if not all(s in per_request_ms for s in steps):
        return None
    return sum(per_request_ms[s] for s in steps)


def _scored_rows(rows: Sequence[dict], best_single: tuple[str, Sequence[str]] | None):
    """(rows with stored candidates, their references, candidates, each candidate's ROUGE-L F, and the
    best single model's per-metric statistics on those rows or None); None when no row has candidates."""
    from duetto.workflows.stats import METRICS

    keep = [i for i, r in enumerate(rows) if r.get("ensemble_candidates")]
    if not keep:
        return None
    rows = [rows[i] for i in keep]
    refs = [r["reference"] for r in rows]
    cands = stored_candidates(rows)
    single = None
    if best_single is not None:
        answers = [best_single[1][i] for i in keep]
        single = {metric: METRICS[metric][0](answers, refs) for metric in ("rougeL", "bleu4")}
    return rows, refs, cands, candidate_rouge(cands, refs), single


def selection_table(rows: Sequence[dict], *, modes: Mapping[str, Mapping[str, Any]], returned_mode: str,
                    best_single: tuple[str, Sequence[str]] | None = None,
                    per_request_ms: Mapping[str, float] | None = None, n_resamples: int = 1000,
                    seed: int = 0) -> dict:  # fmt: skip
    """Every mode in ``modes`` (mode -> its weights) scored on the same stored candidates.

    A random pick's ROUGE-L is the mean over the k candidates (its expectation, exactly); its BLEU-4 is
    the first sample's (one random draw: corpus BLEU is not a mean). A mode whose features were not
    stored is left out. ``best_single``: (name, its answers to the same rows) for the paired tests."""
    import numpy as np

    from duetto.workflows.stats import METRICS, bootstrap_ci, paired_bootstrap, rouge_from_sums

    scored = _scored_rows(rows, best_single)
    if scored is None:
        return {}
    rows, refs, cands, util, single = scored
    texts: dict[str, list[str]] = {RANDOM_PICK: [cs[0].text for cs in cands]}
    rouge: dict[str, np.ndarray] = {RANDOM_PICK: np.asarray([sum(u) / len(u) for u in util]).reshape(-1, 1)}
    methods = [{"name": RANDOM_PICK, "mode": None, "params": {}}]
    for mode in FITTED_MODES:
        if mode not in modes:
            continue
        params = dict(modes[mode])
        try:
            picks = [choose(cs, mode, params.get("weight", 0.5), params.get("weights")) for cs in cands]
        except ValueError:  # a feature this mode reads was not stored
            continue
        name = f"mode {mode}"
        if "weight" in params:
            name += f", weight {params['weight']:g}"
        if "weights" in params:
            name += ", weights " + ", ".join(f"{f} {w:+g}" for f, w in params["weights"].items())
        if mode == returned_mode:
            name += " (what the ensemble returned)"
        texts[name] = [cs[j].text for cs, j in zip(cands, picks)]
        rouge[name] = np.asarray([u[j] for u, j in zip(util, picks)]).reshape(-1, 1)
        methods.append({"name": name, "mode": mode, "params": params,
                        "latency_ms": step_ms(mode, params, per_request_ms or {})})  # fmt: skip
    best = [max(range(len(u)), key=u.__getitem__) for u in util]
    texts[ORACLE] = [cs[j].text for cs, j in zip(cands, best)]
    rouge[ORACLE] = np.asarray([u[j] for u, j in zip(util, best)]).reshape(-1, 1)
    methods.append({"name": ORACLE, "mode": None, "params": {}})
    bleu_stat, bleu_from = METRICS["bleu4"]
    stats = {m["name"]: {"rougeL": rouge[m["name"]], "bleu4": bleu_stat(texts[m["name"]], refs)} for m in methods}
    from_sums = {"rougeL": rouge_from_sums, "bleu4": bleu_from}
    for m in methods:
        for metric in ("rougeL", "bleu4"):
            m[metric] = bootstrap_ci(stats[m["name"]][metric], from_sums[metric], n_resamples=n_resamples, seed=seed)
    tests = []
    for m in methods[1:-1]:
        tests.append({"a": RANDOM_PICK, "b": m["name"], "metric": "rougeL",
                      **paired_bootstrap(rouge[RANDOM_PICK], rouge[m["name"]], rouge_from_sums,
                                         n_resamples=n_resamples, seed=seed)})  # fmt: skip
        if single is not None:
            for metric in ("rougeL", "bleu4"):
                tests.append({"a": best_single[0], "b": m["name"], "metric": metric,
                              **paired_bootstrap(single[metric], stats[m["name"]][metric], from_sums[metric],
                                                 n_resamples=n_resamples, seed=seed)})  # fmt: skip
    return {"k": max(len(cs) for cs in cands), "num_examples": len(rows), "mode": returned_mode,
            "best_single": best_single[0] if best_single else None, "methods": methods, "tests": tests,
            "features": [f for f in FEATURES if has_features(cands, [f])]}  # fmt: skip


def count_table(rows: Sequence[dict], *, mode: str, params: Mapping[str, Any], counts: Sequence[int],
                best_single: tuple[str, Sequence[str]] | None = None,
                per_request_ms: Mapping[int, Mapping[str, float]] | None = None, n_resamples: int = 1000,
                seed: int = 0) -> dict:  # fmt: skip
    """``mode`` (with ``params``) choosing among the first n stored candidates of each row, for each n in
    ``counts`` (those above the rows' k are left out): the first n of k samples are n samples. Each n
    gets its pick's ROUGE-L F and BLEU-4 with intervals, paired tests against the best single model,
    a random pick's and the oracle's ROUGE-L F among those n, and the model time per request of n
    candidates (``per_request_ms``: n -> that n's step times, as ``step_ms`` reads them). Consensus is
    recomputed among the n: it depends on which candidates stand beside each one."""
    import numpy as np

    from duetto.workflows.stats import METRICS, bootstrap_ci, paired_bootstrap, rouge_from_sums

    scored = _scored_rows(rows, best_single)
    if scored is None:
        return {}
    rows, refs, full, util, single = scored
    k = min(len(cs) for cs in full)
    bleu_stat, bleu_from = METRICS["bleu4"]
    out = []
    for n in sorted({c for c in counts if 1 <= c <= k} | {k}):
        cands = []
        for cs in full:
            sub = [Candidate(c.text, c.generator_logprob, reranker_score=c.reranker_score, prior_score=c.prior_score)
                   for c in cs[:n]]  # fmt: skip
            for c, agree in zip(sub, consensus_scores([c.text for c in sub])):
                c.consensus = agree
            cands.append(sub)
        picks = [choose(cs, mode, params.get("weight", 0.5), params.get("weights")) for cs in cands]
        rouge = np.asarray([u[j] for u, j in zip(util, picks)]).reshape(-1, 1)
        bleu = bleu_stat([cs[j].text for cs, j in zip(cands, picks)], refs)
        oracle = np.asarray([max(u[:n]) for u in util]).reshape(-1, 1)
        entry: dict[str, Any] = {
            "n": n,
            "rougeL": bootstrap_ci(rouge, rouge_from_sums, n_resamples=n_resamples, seed=seed),
            "bleu4": bootstrap_ci(bleu, bleu_from, n_resamples=n_resamples, seed=seed),
            "random_rougeL": float(np.mean([sum(u[:n]) / n for u in util])),
            "oracle_rougeL": bootstrap_ci(oracle, rouge_from_sums, n_resamples=n_resamples, seed=seed),
            "latency_ms": step_ms(mode, params, (per_request_ms or {}).get(n, {})),
        }
        if single is not None:
            entry["vs_best_single"] = {
                "rougeL": paired_bootstrap(single["rougeL"], rouge, rouge_from_sums, n_resamples=n_resamples, seed=seed),
                "bleu4": paired_bootstrap(single["bleu4"], bleu, bleu_from, n_resamples=n_resamples, seed=seed),
            }
        out.append(entry)
    return {"mode": mode, "params": dict(params), "k": k, "num_examples": len(rows),
            "best_single": best_single[0] if best_single else None, "counts": out}  # fmt: skip
