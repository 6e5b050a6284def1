"""Statistics of the report: 95% percentile bootstrap intervals and paired bootstrap tests of BLEU-4
and ROUGE-L over test examples, computed from per-example statistics.

BLEU-4 is sacrebleu's corpus BLEU (0-100); ROUGE-L is rouge-score's F-measure averaged over examples
(0-1), both as trainers/evaluate.py scores trials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from duetto.trainers.evaluate import rouge_l_scores

# Bootstrap over examples without re-scoring text: each metric is a sum of per-example statistics
# (sacrebleu's n-gram counts and lengths; one ROUGE-L F per example), so a resample is an index
# draw and a sum. Re-running sacrebleu and rouge-score on every resample took over ten minutes for
# one 365-example report on the H200 machine; this takes well under a second. sacrebleu's own
# significance tests (sacrebleu.significance) resample the same statistics the same way.


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(n, 10) per-example BLEU statistics: hypothesis and reference length, 4 matched and 4 total n-gram counts."""
    from sacrebleu.metrics.bleu import BLEU

    stats = BLEU()._extract_corpus_statistics(list(predictions), [list(references)]) if predictions else []
    return np.asarray(stats, dtype=np.int64).reshape(-1, 10)


def bleu_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    """Corpus BLEU (0-100) of each row of summed statistics; equals sacrebleu.corpus_bleu on those examples."""
    from sacrebleu.metrics.bleu import BLEU

    metric = BLEU()
    return np.array([metric._compute_score_from_stats(row).score for row in np.atleast_2d(sums)])


def rouge_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """(n, 1) per-example ROUGE-L F-measures."""
    return np.asarray(rouge_l_scores(predictions, references), dtype=np.float64).reshape(-1, 1)


def rouge_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    return np.atleast_2d(sums)[:, 0] / max(1, n)


def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(B, n): how often each example is drawn in each resample. ``counts @ stats`` is then every
    resample's summed statistics without materialising B x n x d copies of them."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], idx), 1)
    return counts


#: name -> (per-example statistics, score of summed statistics)
METRICS: dict[str, tuple[Callable[[Sequence[str], Sequence[str]], np.ndarray], Callable[[np.ndarray, int], np.ndarray]]] = {
    "bleu4": (bleu_stats, bleu_from_sums),
    "rougeL": (rouge_stats, rouge_from_sums),
}


def bootstrap_ci(stats: np.ndarray, from_sums: Callable[[np.ndarray, int], np.ndarray], *, n_resamples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap over examples of per-example ``stats``."""
    n = len(stats)
    if n == 0:
        return 0.0, 0.0, 0.0
    point = float(from_sums(stats.sum(axis=0), n)[0])
    counts = _resample_counts(n, n_resamples, seed)
    lo, hi = np.quantile(from_sums(counts @ stats, n), [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def paired_bootstrap(stats_a: np.ndarray, stats_b: np.ndarray, from_sums: Callable[[np.ndarray, int], np.ndarray], *,
                     n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of metric(B) - metric(A) on the same resampled examples.

    Returns the observed delta, its 95% interval, and p = share of resamples where B is not better
    (one-sided: small p means B beats A).
    """
    n = len(stats_a)
    if n != len(stats_b):
        raise ValueError(f"paired bootstrap over {n} and {len(stats_b)} examples")
    if n == 0:
        return {"delta": 0.0, "low": 0.0, "high": 0.0, "p_not_better": 1.0}
    observed = float(from_sums(stats_b.sum(axis=0), n)[0] - from_sums(stats_a.sum(axis=0), n)[0])
    counts = _resample_counts(n, n_resamples, seed)
    deltas = from_sums(counts @ stats_b, n) - from_sums(counts @ stats_a, n)
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    return {"delta": observed, "low": float(lo), "high": float(hi), "p_not_better": float(np.mean(deltas <= 0))}
