"""Trial evaluation: the metrics are sacrebleu's and rouge-score's, and the answers are decoded from
exactly the prompt ids a trained model saw (BOS kept when a long prompt is cut)."""

from __future__ import annotations

import pytest
import sacrebleu
import torch

from duetto.trainers.evaluate import evaluate_generation, text_metrics

PREDS = ["the cat sat on the mat", "a dog ran fast", "red sun over the river"]
REFS = ["the cat sat on a mat", "the dog ran very fast", "a blue moon over the river"]


def test_text_metrics_are_corpus_bleu_and_mean_rouge_l():
    from rouge_score import rouge_scorer

    m = text_metrics(PREDS, REFS)
    assert m["bleu4"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    f = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)]
    assert m["rougeL"] == pytest.approx(sum(f) / len(f))
    assert text_metrics([], []) == {"bleu4": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        text_metrics(PREDS[:2], REFS)


def test_rouge_l_equals_rouge_score_exactly():
    """Tokenized once and counted bit-parallel, ROUGE-L F is rouge-score's own value, bit for bit, on
    texts with repeats, stems, punctuation, case, digits, non-ASCII and empty strings."""
    import random

    from rouge_score import rouge_scorer

    from duetto.trainers.evaluate import lcs_length, rouge_l_scores

    rnd = random.Random(0)
    vocab = "the cats sat running on mats, a dog ran far. Ran RUNS 3 x-y café naïve".split()
    preds = [" ".join(rnd.choice(vocab) for _ in range(rnd.randint(0, 40))) for _ in range(300)]
    refs = [" ".join(rnd.choice(vocab) for _ in range(rnd.randint(0, 150))) for _ in range(300)]
    preds[:3], refs[3:5] = ["", "...", refs[2]], ["", "!!"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l_scores(preds, refs) == [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    for _ in range(500):
        a = [rnd.choice("abcd") for _ in range(rnd.randint(0, 90))]
        b = [rnd.choice("abcd") for _ in range(rnd.randint(0, 90))]
        assert lcs_length(a, b) == (rouge_scorer._lcs_table(a, b)[-1][-1] if a and b else 0)


def test_trial_evaluation_decodes_the_cut_prompt_with_its_bos(tiny_gemma_dir):
    from transformers import AutoModelForCausalLM

    from duetto.data.prompts import build_prompt, encode_prompt
    from duetto.models import load_tokenizer
    from duetto.tokens import stop_token_ids

    tok = load_tokenizer(str(tiny_gemma_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    long = " ".join(["The children played in the garden while their parents cooked dinner."] * 6)
    rows = [{"instruction": "Summarize the text.", "input": long, "response": "Children played."},
            {"instruction": "Name a fruit.", "input": "", "response": "Apple."}]  # fmt: skip
    model.train()  # a trial evaluates in the middle of training
    metrics, preds = evaluate_generation(model, tok, rows, template="study", max_seq_len=32, max_new_tokens=6,
                                         batch_size=2)  # fmt: skip
    assert model.training and set(metrics) == {"bleu4", "rougeL"}
    model.eval()
    stop = stop_token_ids(tok, model.config)
    for row, pred in zip(rows, preds):
        ids = encode_prompt(build_prompt(row["instruction"], row["input"]), tok)
        if len(ids) > 32:  # what training keeps of a long prompt: BOS + the last 31 ids
            ids = ids[:1] + ids[-31:]
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():  # the reference: one unpadded greedy decode of those ids
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        new = [t for t in out[0, len(ids):].tolist()]
        end = next((i for i, t in enumerate(new) if t in stop), len(new))
        assert pred == tok.decode(new[:end], skip_special_tokens=True).strip()
