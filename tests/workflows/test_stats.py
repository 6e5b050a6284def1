"""The report's statistics: resampling summed per-example statistics must give exactly what re-scoring
the resampled texts with sacrebleu / rouge-score gives."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sacrebleu

from duetto.trainers.evaluate import bleu4, rouge_l_scores
from duetto.workflows.stats import METRICS, bootstrap_ci, paired_bootstrap


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:  # the re-scoring reference
    return float(np.mean(rouge_l_scores(predictions, references)))


WORDS = "the a cat dog sat on mat ran fast slow red blue big small house tree river sun moon".split()


def _texts(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    refs = [" ".join(rng.choices(WORDS, k=rng.randint(4, 14))) for _ in range(n)]

    def noisy(ref: str, p: float) -> str:  # keep each word with probability p, else a random one
        return " ".join(w if rng.random() < p else rng.choice(WORDS) for w in ref.split()) or "x"

    return [noisy(r, 0.5) for r in refs], [noisy(r, 0.8) for r in refs], refs


@pytest.mark.parametrize("name,scorer", [("bleu4", bleu4), ("rougeL", mean_rouge_l)])
def test_summed_statistics_equal_rescoring_every_subset(name, scorer):
    preds, _, refs = _texts(40, 0)
    stat, from_sums = METRICS[name]
    stats = stat(preds, refs)
    assert stats.shape[0] == 40
    rng = np.random.default_rng(1)
    for _ in range(5):  # a resample, duplicates and all, scores as the re-scored texts do
        idx = rng.integers(0, 40, size=40)
        fast = float(from_sums(stats[idx].sum(axis=0), 40)[0])
        slow = scorer([preds[i] for i in idx], [refs[i] for i in idx])
        assert fast == pytest.approx(slow, abs=1e-9)
    assert float(from_sums(stats.sum(axis=0), 40)[0]) == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs]).score if name == "bleu4" else mean_rouge_l(preds, refs), abs=1e-9
    )


def test_bootstrap_interval_and_paired_test_see_a_real_difference():
    weak, strong, refs = _texts(200, 2)
    for name, (stat, from_sums) in METRICS.items():
        a, b = stat(weak, refs), stat(strong, refs)
        point, lo, hi = bootstrap_ci(a, from_sums, n_resamples=300, seed=0)
        assert lo < point < hi
        t = paired_bootstrap(a, b, from_sums, n_resamples=300, seed=0)
        assert t["delta"] > 0 and t["low"] > 0 and t["p_not_better"] == 0.0, (name, t)
        same = paired_bootstrap(a, a, from_sums, n_resamples=300, seed=0)
        assert same["delta"] == 0 and same["low"] == 0 == same["high"] and same["p_not_better"] == 1.0


def test_paired_bootstrap_rejects_unequal_lengths():
    stat, from_sums = METRICS["rougeL"]
    with pytest.raises(ValueError, match="3 and 2"):
        paired_bootstrap(stat(["a"] * 3, ["a"] * 3), stat(["a"] * 2, ["a"] * 2), from_sums)


def test_empty_inputs_give_zero_not_a_crash():
    for stat, from_sums in METRICS.values():
        empty = stat([], [])
        assert len(empty) == 0
        assert bootstrap_ci(empty, from_sums) == (0.0, 0.0, 0.0)
        assert paired_bootstrap(empty, empty, from_sums)["delta"] == 0.0
