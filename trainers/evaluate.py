"""Evaluation of a trial: greedy answers for held-out rows, scored with BLEU-4 and ROUGE-L.

Answers come from ``trainers.inference`` (the decoding the report and Serve run), with each prompt
cut to the trial's ``max_seq_len`` as Serve cuts it for the saved model, so a sweep chooses on the
metrics `duetto report` and the endpoint reproduce.

BLEU-4 is sacrebleu's corpus BLEU (its default is 4-gram, exp smoothing), on the 0-100 scale the
study used. ROUGE-L is rouge-score's F-measure averaged over examples (0-1), with stemming.
"""

from __future__ import annotations

from collections.abc import Sequence


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


def evaluate_generation(model, tokenizer, rows: Sequence[dict], *, template: str, max_seq_len: int,
                        max_new_tokens: int, batch_size: int) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """Greedy answers for unified rows with the trial's template; returns metrics and the answers."""
    from duetto.trainers.inference import greedy_decode, prompt_text

    prompts = [prompt_text(tokenizer, template, r["instruction"], r.get("input", "")) for r in rows]
    cands = greedy_decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, max_prompt_tokens=max_seq_len,
                          batch_size=batch_size, logprobs=False)  # fmt: skip
    preds = [c.text for c in cands]
    return text_metrics(preds, [r["response"] for r in rows]), preds
