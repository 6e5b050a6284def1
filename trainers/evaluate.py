"""Evaluation of a trial: greedy answers for held-out rows, scored with BLEU-4 and ROUGE-L.

Answers come from ``trainers.inference`` (the decoding the report and Serve run), with each prompt
cut to the trial's ``max_seq_len`` as Serve cuts it for the saved model, so a sweep chooses on the
metrics `duetto report` and the endpoint reproduce.

BLEU-4 is sacrebleu's corpus BLEU (its default is 4-gram, exp smoothing), on the 0-100 scale the
study used. ROUGE-L is rouge-score's F-measure averaged over examples (0-1), with stemming.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """rouge-score's ROUGE-L F (stemmed) of each prediction against its reference.

    Each distinct text goes through rouge-score's tokenizer once, and the longest common subsequence
    is counted bit-parallel (``lcs_length``) rather than in rouge-score's Python table: a report
    scores every candidate against its reference and every candidate against the others, where
    ``RougeScorer.score`` re-tokenizes and fills a table for each pair. Equal to
    ``RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)`` (tested)."""
    tokens = rouge_tokens()
    return [rouge_l_f(tokens(ref), tokens(pred)) for pred, ref in zip(predictions, references)]


def rouge_tokens():
    """rouge-score's stemming tokenizer, memoised per text for one batch of scoring."""
    tokenize = _rouge_tokenizer().tokenize
    seen: dict[str, list[str]] = {}

    def tokens(text: str) -> list[str]:
        if text not in seen:
            seen[text] = tokenize(text)
        return seen[text]

    return tokens


@functools.cache
def _rouge_tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)  # what RougeScorer(use_stemmer=True) tokenizes with


def rouge_l_f(target: Sequence[str], prediction: Sequence[str]) -> float:
    """ROUGE-L F of two token lists, as rouge-score's ``_score_lcs`` computes it."""
    from rouge_score import scoring

    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    return scoring.fmeasure(lcs / len(prediction), lcs / len(target))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (Hyyrö's bit-vector algorithm: a
    row of the LCS table is a mask of len(a) bits, updated with a few integer operations per item of
    ``b``)."""
    if not a or not b:
        return 0
    match: dict = {}
    for i, x in enumerate(a):
        match[x] = match.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for y in b:
        u = row & match.get(y, 0)
        row = ((row + u) | (row - u)) & full
    return len(a) - row.bit_count()


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"bleu4": 0.0, "rougeL": 0.0}
    r = rouge_l_scores(predictions, references)
    return {"bleu4": bleu4(predictions, references), "rougeL": sum(r) / len(r)}


def evaluate_generation(model, tokenizer, rows: Sequence[dict], *, template: str, max_seq_len: int,
                        max_new_tokens: int, batch_size: int) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """Greedy answers for unified rows with the trial's template; returns metrics and the answers."""
    from duetto.trainers.inference import greedy_decode, prompt_text

    prompts = [prompt_text(tokenizer, template, r["instruction"], r.get("input", "")) for r in rows]
    cands = greedy_decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, max_prompt_tokens=max_seq_len,
                          batch_size=batch_size, logprobs=False)  # fmt: skip
    preds = [c.text for c in cands]
    return text_metrics(preds, [r["response"] for r in rows]), preds
