"""Evaluation shared by trials, the baseline and the report: batched generation, BLEU-4, ROUGE-L,
and bootstrap confidence intervals.

BLEU-4 is sacrebleu's corpus BLEU (its default is 4-gram, exp smoothing), on the 0-100 scale the
study used. ROUGE-L is rouge-score's F-measure averaged over examples (0-1), with stemming.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

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


def bootstrap_ci(
    predictions: Sequence[str],
    references: Sequence[str],
    metric: Callable[[list[str], list[str]], float],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile bootstrap over examples."""
    rng = random.Random(seed)
    n = len(predictions)
    preds, refs = list(predictions), list(references)
    point = metric(preds, refs)
    stats = []
    for _ in range(n_resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(metric([preds[i] for i in idx], [refs[i] for i in idx]))
    stats.sort()
    lo = stats[int((alpha / 2) * n_resamples)]
    hi = stats[min(n_resamples - 1, int((1 - alpha / 2) * n_resamples))]
    return point, lo, hi


def paired_bootstrap(
    preds_a: Sequence[str],
    preds_b: Sequence[str],
    references: Sequence[str],
    metric: Callable[[list[str], list[str]], float],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of metric(B) - metric(A) on the same resampled examples.

    Returns the observed delta, its 95% interval, and p = share of resamples where B is not better
    (one-sided: small p means B beats A).
    """
    rng = random.Random(seed)
    n = len(references)
    a, b, r = list(preds_a), list(preds_b), list(references)
    observed = metric(b, r) - metric(a, r)
    deltas = []
    for _ in range(n_resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        ri = [r[i] for i in idx]
        deltas.append(metric([b[i] for i in idx], ri) - metric([a[i] for i in idx], ri))
    deltas.sort()
    p = sum(1 for d in deltas if d <= 0) / n_resamples
    return {
        "delta": observed,
        "low": deltas[int(0.025 * n_resamples)],
        "high": deltas[min(n_resamples - 1, int(0.975 * n_resamples))],
        "p_not_better": p,
    }


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    s = rouge_l_scores(predictions, references)
    return sum(s) / len(s) if s else 0.0


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
