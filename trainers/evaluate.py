"""Evaluation shared by trials, the baseline and the report: batched generation, BLEU-4, ROUGE-L,
and bootstrap confidence intervals.

BLEU-4 is sacrebleu's corpus BLEU (its default is 4-gram, exp smoothing), on the 0-100 scale the
study used. ROUGE-L is rouge-score's F-measure averaged over examples (0-1), with stemming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    stop_ids: Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Generate one response per prompt text (already templated), greedy by default."""
    from duetto.models import ensure_pad_token, stop_token_ids

    ensure_pad_token(tokenizer)
    stop = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, getattr(model, "config", None))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    from duetto.data.prompts import encode_prompt

    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            # The prompt ids exactly as training saw them (BOS once), cut and padded on the left:
            # generation continues from the right edge, and a long prompt loses its beginning,
            # never the "Response:" cue it ends with.
            ids = [encode_prompt(p, tokenizer) for p in prompts[i : i + batch_size]]
            if max_prompt_tokens:
                ids = [x[-max_prompt_tokens:] for x in ids]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            gen_kwargs: dict[str, Any] = dict(
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                do_sample=do_sample,
            )
            if do_sample:
                gen_kwargs.update(temperature=temperature, top_p=top_p)
            else:  # keep a model's sampling defaults from warning under greedy decoding
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                gen = model.generate(input_ids=input_ids, attention_mask=attention, **gen_kwargs)
            new = gen[:, width:]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        if was_training:
            model.train()
    return out


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"bleu4": 0.0, "rougeL": 0.0}
    r = rouge_l_scores(predictions, references)
    return {"bleu4": bleu4(predictions, references), "rougeL": sum(r) / len(r)}


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


def bootstrap_ci(
    stats: np.ndarray,
    from_sums: Callable[[np.ndarray, int], np.ndarray],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap over examples of per-example ``stats``."""
    n = len(stats)
    if n == 0:
        return 0.0, 0.0, 0.0
    point = float(from_sums(stats.sum(axis=0), n)[0])
    counts = _resample_counts(n, n_resamples, seed)
    lo, hi = np.quantile(from_sums(counts @ stats, n), [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def paired_bootstrap(
    stats_a: np.ndarray,
    stats_b: np.ndarray,
    from_sums: Callable[[np.ndarray, int], np.ndarray],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
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


def evaluate_generation(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    template: str,
    max_seq_len: int,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[dict[str, float], list[str]]:
    """Generate for unified rows with the trial's template; return metrics and the predictions."""
    from duetto.data.prompts import build_prompt

    prompts = [build_prompt(r["instruction"], r.get("input", ""), template=template, tokenizer=tokenizer) for r in rows]
    preds = generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_prompt_tokens=max_seq_len,
    )
    return text_metrics(preds, [r["response"] for r in rows]), preds
