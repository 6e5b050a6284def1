"""How the ensemble picks one of its k candidates: the modes, the features they read, and fitting
their weights on held-out rows.

Each candidate can carry four features, all computed without the reference:

- ``reranker``: the reranker's mean token log-prob of the answer after the prompt;
- ``generator``: the generator's own mean token log-prob of its sample;
- ``prior``: the reranker's mean token log-prob of the answer after an empty instruction. Likelihood
  prefers short, bland, repetitive answers that are likely after any prompt; ``reranker - w * prior``
  (pointwise mutual information at w = 1) keeps what the prompt explains;
- ``consensus``: the candidate's mean ROUGE-L F against the other candidates: minimum-Bayes-risk
  selection, the sample closest to what the generator tends to say.

A mode is a rule over them. ``combined`` is a weighted sum of the features, each standardised over the
request's candidates (so weights compare across features whose scales differ); ``duetto report`` fits
its weights, and every other mode's single weight, on validation rows (``fit_modes``).
"""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Literal

#: How the answer is chosen; "reranker-greedy" (the reranker model answering alone) is a comparison.
Mode = Literal["reranker", "mix", "generator", "consensus", "pmi", "combined", "reranker-greedy"]
MODES: tuple[str, ...] = typing.get_args(Mode)
FEATURES = ("reranker", "generator", "prior", "consensus")
#: The modes fitted on validation rows, simplest first (the first of equal scores is kept).
FITTED_MODES = ("reranker", "generator", "mix", "consensus", "pmi", "combined")
#: The features each mode reads (combined: those its weights name).
MODE_FEATURES = {"reranker": ("reranker",), "mix": ("reranker", "generator"), "generator": ("generator",),
                 "consensus": ("consensus",), "pmi": ("reranker", "prior"), "reranker-greedy": ()}  # fmt: skip
#: Values tried for a mode's one weight (mix: the generator's share; pmi: the prior's) when fitting.
WEIGHT_GRID = tuple(i / 10 for i in range(11))
#: Values tried for each feature's weight in mode combined.
COMBINED_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def check_mode(mode: str, weights: Mapping[str, float] | None = None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: one of {', '.join(MODES)}, got {mode!r}")
    if mode == "combined":
        unknown = sorted(set(weights or {}) - set(FEATURES))
        if unknown:
            raise ValueError(f"weights: unknown feature {unknown[0]!r} (features: {', '.join(FEATURES)})")
        if not any((weights or {}).get(f, 0.0) for f in FEATURES):
            raise ValueError("mode combined: weights must give at least one feature a non-zero weight")


def features_for(mode: str, weights: Mapping[str, float] | None = None) -> tuple[str, ...]:
    if mode == "combined":
        return tuple(f for f in FEATURES if (weights or {}).get(f, 0.0))
    return MODE_FEATURES[mode]


def feature(c, name: str) -> float:
    value = {"reranker": c.reranker_score, "generator": c.generator_logprob, "prior": c.prior_score,
             "consensus": c.consensus}[name]  # fmt: skip
    if value is None:
        raise ValueError(f"candidate has no {name} score")
    return float(value)


def has_features(candidates: Sequence[Sequence], names: Sequence[str]) -> bool:
    """Every candidate of every request carries each feature in ``names``."""
    try:
        for cs in candidates:
            for c in cs:
                for n in names:
                    feature(c, n)
    except ValueError:
        return False
    return True


def consensus_scores(texts: Sequence[str]) -> list[float]:
    """Each text's mean ROUGE-L F against the others (0.0 for a lone text): rouge-score's tokenizer and
    F-measure, each text tokenized once (``trainers.evaluate.rouge_l_scores``)."""
    from duetto.trainers.evaluate import rouge_l_f, rouge_tokens

    n = len(texts)
    if n < 2:
        return [0.0] * n
    tokenize = rouge_tokens()
    tokens = [tokenize(t) for t in texts]
    sim = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):  # ROUGE-L F is symmetric
        sim[i][j] = sim[j][i] = rouge_l_f(tokens[i], tokens[j])
    return [sum(row) / (n - 1) for row in sim]


def _standardised(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / sd if sd > 0 else 0.0 for v in values]


def scores(candidates: Sequence, mode: str, weight: float = 0.5, weights: Mapping[str, float] | None = None) -> list[float]:
    """Each candidate's score under ``mode`` (higher is chosen)."""
    if mode in ("reranker", "reranker-greedy"):
        return [feature(c, "reranker") for c in candidates]
    if mode == "generator":
        return [feature(c, "generator") for c in candidates]
    if mode == "consensus":
        return [feature(c, "consensus") for c in candidates]
    if mode == "mix":
        return [(1.0 - weight) * feature(c, "reranker") + weight * feature(c, "generator") for c in candidates]
    if mode == "pmi":
        return [feature(c, "reranker") - weight * feature(c, "prior") for c in candidates]
    if mode == "combined":
        check_mode(mode, weights)
        total = [0.0] * len(candidates)
        for name in features_for(mode, weights):
            for i, z in enumerate(_standardised([feature(c, name) for c in candidates])):
                total[i] += weights[name] * z
        return total
    raise ValueError(f"mode: one of {', '.join(MODES)}, got {mode!r}")


def choose(candidates: Sequence, mode: str = "reranker", weight: float = 0.5,
           weights: Mapping[str, float] | None = None) -> int:  # fmt: skip
    """Index of the best candidate under ``mode``; ties go to the earliest (the first sample)."""
    if not candidates:
        raise ValueError("choose: no candidates")
    if mode == "reranker-greedy" and candidates[0].reranker_score is None:
        return 0  # one greedy answer from the reranker model: nothing to compare
    s = scores(candidates, mode, weight, weights)
    return max(range(len(s)), key=lambda i: (s[i], -i))


def mode_params(mode: str, weight: float, weights: Mapping[str, float] | None) -> dict:
    """What a mode's choice depends on, for reports and answers."""
    if mode in ("mix", "pmi"):
        return {"weight": weight}
    if mode == "combined":
        return {"weights": {f: float(w) for f, w in (weights or {}).items() if w}}
    return {}


def fitted_params(fitted: Mapping) -> dict:
    """The weights of one ``fit_modes`` entry (without its scores)."""
    return {k: v for k, v in fitted.items() if k in ("weight", "weights")}


def fit_modes(candidates: Sequence[Sequence], utilities: Sequence[Sequence[float]],
              modes: Sequence[str] = FITTED_MODES) -> dict:
    """Each mode's weight (or weights) maximising the mean utility of its picks, and that mean.

    ``utilities[i][j]`` is candidate j of row i scored against row i's reference (ROUGE-L F): use
    validation rows, never the rows the result will be reported on. A mode whose features some
    candidate lacks is left out. Ties keep the first grid value (weights near the plain rule).

    The picks are those of ``choose`` (tested): each feature is held as a rows x candidates array and
    every grid point's scores are computed with the same float operations in the same order, so the
    1,295 weightings of ``combined`` cost array operations instead of a Python pass over every
    candidate each."""
    import numpy as np

    if any(len(cs) == 0 for cs in candidates):
        raise ValueError("choose: no candidates")
    rows = len(candidates)
    width = max((len(cs) for cs in candidates), default=0)
    present = np.zeros((rows, width), dtype=bool)
    for i, cs in enumerate(candidates):
        present[i, : len(cs)] = True

    def matrix(values_per_row) -> np.ndarray:
        m = np.zeros((rows, width))
        for i, vs in enumerate(values_per_row):
            m[i, : len(vs)] = vs
        return m

    raw = {f: matrix([[feature(c, f) for c in cs] for cs in candidates])
           for f in FEATURES if has_features(candidates, [f])}  # fmt: skip

    def mean_pick(score: np.ndarray) -> float:
        picks = np.argmax(np.where(present, score, -np.inf), axis=1).tolist()  # first of equal scores, as choose
        for i in np.flatnonzero(np.isnan(score).any(axis=1)).tolist():  # NaN orders differently in max and argmax
            row = score[i, : len(candidates[i])].tolist()
            picks[i] = max(range(len(row)), key=lambda j: (row[j], -j))
        chosen = [u[j] for u, j in zip(utilities, picks)]
        return sum(chosen) / len(chosen)

    out: dict[str, dict] = {}
    with np.errstate(invalid="ignore"):  # 0 * -inf is NaN here as in the Python rule, without a warning
        for mode in modes:
            if mode == "combined":
                names = [f for f in FEATURES if f in raw]
                z = {f: matrix([_standardised([feature(c, f) for c in cs]) for cs in candidates]) for f in names}
                best = None
                for ws in itertools.product(COMBINED_GRID, repeat=len(names)):
                    if not any(ws):
                        continue
                    total = np.zeros((rows, width))
                    for f, w in zip(names, ws):
                        if w:
                            total = total + w * z[f]
                    value = mean_pick(total)
                    if best is None or value > best[0]:
                        best = (value, dict(zip(names, ws)))
                if best is not None:
                    out[mode] = {"weights": {f: w for f, w in best[1].items() if w}, "mean_rougeL": best[0]}
            elif all(f in raw for f in MODE_FEATURES[mode]):
                if mode == "mix":
                    grid = ((mean_pick((1.0 - w) * raw["reranker"] + w * raw["generator"]), w) for w in WEIGHT_GRID)
                elif mode == "pmi":
                    grid = ((mean_pick(raw["reranker"] - w * raw["prior"]), w) for w in WEIGHT_GRID)
                elif len(MODE_FEATURES[mode]) == 1:
                    out[mode] = {"mean_rougeL": mean_pick(raw[MODE_FEATURES[mode][0]])}
                    continue
                else:  # no weight and no single feature (reranker-greedy): the rule as it is
                    chosen = [u[choose(cs, mode)] for cs, u in zip(candidates, utilities)]
                    out[mode] = {"mean_rougeL": sum(chosen) / len(chosen)}
                    continue
                value, weight = max(grid, key=lambda t: (t[0], -t[1]))
                out[mode] = {"weight": weight, "mean_rougeL": value}
    return out
