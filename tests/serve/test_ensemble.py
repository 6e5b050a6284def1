"""The ensemble pipeline and the generation/scoring it runs (duetto.trainers.inference) on tiny CPU
models: scores checked against independent references."""

from __future__ import annotations

import asyncio
import typing

import pytest
import torch

from duetto.serve.ensemble import EnsembleRequest, ensemble_generate, run_ensemble
from duetto.serve.selection import MODES, Mode, choose
from duetto.serve.merge import CallInfo
from duetto.trainers.inference import Candidate, generate_candidates, prompt_text, score_candidates

PAIRS = [
    ("What is the capital of France?", "", "The capital of France is Paris."),
    ("Give a synonym for the word big.", "", "A synonym for big is large."),
    (
        "Summarize the following text in one sentence.",
        "Plants need sunlight, water and air to grow.",
        "Plants need light.",
    ),
    ("Name three colors of the rainbow.", "", "Red"),
]


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir, load_lm):
    return load_lm(tiny_gemma_dir, "study")


@pytest.fixture(scope="module")
def smollm(tiny_smollm_dir, load_lm):
    return load_lm(tiny_smollm_dir, "chat")


@pytest.mark.parametrize("which", ["gemma", "smollm"])
def test_score_is_mean_loglik_of_the_training_encoding(which, request):
    """One padded batch of mixed lengths scores each pair exactly as HF's own loss on that pair alone."""
    from duetto.data.prompts import encode_example

    lm = request.getfixturevalue(which)
    scores = score_candidates(lm.model, lm.tokenizer, PAIRS, template=lm.template, max_seq_len=256)
    assert len(scores) == len(PAIRS)
    for (instruction, inp, response), score in zip(PAIRS, scores):
        enc = encode_example({"instruction": instruction, "input": inp, "response": response}, lm.tokenizer,
                             template=lm.template, max_seq_len=256)  # fmt: skip
        with torch.no_grad():
            loss = lm.model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss
        # HF's loss comes from the full forward: scoring through hidden states + head must agree
        assert score == pytest.approx(-loss.item(), abs=1e-4)


def _reference_logprobs(lm, prompt: str, ids: list[int], temperature: float = 1.0) -> float:
    """Mean log-prob of ``ids`` after ``prompt`` from one unpadded forward pass."""
    from duetto.data.prompts import encode_prompt

    p = encode_prompt(prompt, lm.tokenizer)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([p + ids])).logits[0, len(p) - 1 : -1].float()
    lp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
    return lp.mean().item()


@pytest.mark.parametrize("which", ["gemma", "smollm"])
def test_generator_logprob_is_the_models_raw_logprob(which, request):
    lm = request.getfixturevalue(which)
    prompts = [prompt_text(lm.tokenizer, lm.template, q, i) for q, i, _ in PAIRS[:3]]
    out = generate_candidates(lm.model, lm.tokenizer, prompts, [2, 1, 3], max_new_tokens=10, temperature=0.5,
                              top_p=0.9, seed=7, stop_ids=lm.stop_ids)  # fmt: skip
    assert [len(c) for c in out] == [2, 1, 3]
    for prompt, cands in zip(prompts, out):
        for c in cands:
            assert 1 <= c.tokens == len(c.token_ids) <= 10
            assert (c.finish_reason == "stop") == (c.token_ids[-1] in lm.stop_ids)
            assert c.generator_logprob == pytest.approx(_reference_logprobs(lm, prompt, c.token_ids), abs=1e-4)
            # not the sampler's temperature-warped distribution
            assert c.generator_logprob != pytest.approx(_reference_logprobs(lm, prompt, c.token_ids, 0.5), abs=1e-3)
            assert (
                c.text
                == lm.tokenizer.decode(
                    [t for t in c.token_ids if t not in lm.stop_ids], skip_special_tokens=True
                ).strip()
            )


def test_greedy_batch_equals_each_prompt_alone(gemma):
    """Left padding must not change what a prompt generates."""
    prompts = [prompt_text(gemma.tokenizer, gemma.template, q, i) for q, i, _ in PAIRS]
    batched = generate_candidates(gemma.model, gemma.tokenizer, prompts, 4, max_new_tokens=8, temperature=0.0,
                                  stop_ids=gemma.stop_ids)  # fmt: skip
    assert all(len(c) == 1 for c in batched)  # greedy: one candidate whatever k says
    for prompt, cands in zip(prompts, batched):
        alone = generate_candidates(gemma.model, gemma.tokenizer, [prompt], 1, max_new_tokens=8, temperature=0.0,
                                    stop_ids=gemma.stop_ids)  # fmt: skip
        assert alone[0][0].token_ids == cands[0].token_ids
        assert alone[0][0].generator_logprob == pytest.approx(cands[0].generator_logprob, abs=1e-4)


@pytest.mark.parametrize("which", ["gemma", "smollm"])
def test_greedy_candidate_is_the_greedy_answer_beside_samples(which, request):
    """greedy_first: each prompt's first candidate equals its greedy decoding, with the model's own
    log-prob; the others are still sampled (at temperature 2 they differ from it)."""
    lm = request.getfixturevalue(which)
    prompts = [prompt_text(lm.tokenizer, lm.template, q, i) for q, i, _ in PAIRS[:3]]
    greedy = generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=8, temperature=0.0,
                                 stop_ids=lm.stop_ids)  # fmt: skip
    out = generate_candidates(lm.model, lm.tokenizer, prompts, [3, 1, 4], max_new_tokens=8, temperature=2.0,
                              top_p=1.0, seed=0, stop_ids=lm.stop_ids, greedy_first=True)  # fmt: skip
    assert [len(c) for c in out] == [3, 1, 4]
    for prompt, (g,), cands in zip(prompts, greedy, out):
        assert cands[0].token_ids == g.token_ids
        assert cands[0].generator_logprob == pytest.approx(_reference_logprobs(lm, prompt, g.token_ids), abs=1e-4)
    assert any(c.token_ids != cs[0].token_ids for cs in out for c in cs[1:])


def test_choose_modes():
    cands = [
        Candidate("a", generator_logprob=-0.5, reranker_score=-3.0),
        Candidate("b", generator_logprob=-2.0, reranker_score=-1.0),
        Candidate("c", generator_logprob=-1.0, reranker_score=-1.0),
    ]
    assert choose(cands, "generator") == 0
    assert choose(cands, "reranker") == 1  # tie with c: the earlier sample wins
    assert choose(cands, "mix", 0.0) == 1
    assert choose(cands, "mix", 1.0) == 0
    assert choose(cands, "mix", 0.5) == 2  # -1.0 beats -1.5 (b) and -1.75 (a)
    assert choose([Candidate("g", reranker_score=-2.0)], "reranker-greedy") == 0
    with pytest.raises(ValueError, match="no reranker score"):
        choose([Candidate("x", generator_logprob=-1.0)], "reranker")
    with pytest.raises(ValueError, match="mode"):
        choose(cands, "best")
    with pytest.raises(ValueError, match="no candidates"):
        choose([], "reranker")


def test_reranker_changes_the_choice(tiny_smollm_dir, load_lm):
    """A reranker that learned the right answer overrules a generator that prefers a wrong one."""
    from duetto.data.prompts import encode_example

    lm = load_lm(tiny_smollm_dir, "chat")
    question, good, bad = (
        "What is the capital of Italy?",
        "The capital of Italy is Rome.",
        "Monday, Tuesday and Friday.",
    )
    before = score_candidates(
        lm.model, lm.tokenizer, [(question, "", good), (question, "", bad)], template="chat", max_seq_len=128
    )
    enc = encode_example({"instruction": question, "response": good}, lm.tokenizer, template="chat", max_seq_len=128)
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
    torch.manual_seed(0)
    opt = torch.optim.Adam(lm.model.parameters(), lr=3e-3)
    lm.model.train()
    for _ in range(30):
        opt.zero_grad()
        lm.model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    lm.model.eval()
    after = score_candidates(
        lm.model, lm.tokenizer, [(question, "", good), (question, "", bad)], template="chat", max_seq_len=128
    )
    assert after[0] > before[0] + 1.0 and after[0] > after[1] + 1.0
    # the generator liked the bad answer better
    cands = [
        Candidate(bad, generator_logprob=-0.2, reranker_score=after[1]),
        Candidate(good, generator_logprob=-2.5, reranker_score=after[0]),
    ]
    assert choose(cands, "generator") == 0
    assert choose(cands, "reranker") == 1
    assert choose(cands, "mix", 0.2) == 1


def test_ensemble_generate_end_to_end(gemma, smollm):
    reqs = [
        EnsembleRequest("What is the capital of Japan?", k=3, max_new_tokens=6, seed=11),
        EnsembleRequest("Name three colors.", k=2, max_new_tokens=6),
        EnsembleRequest("Why is exercise important?", "", k=1, max_new_tokens=6),
    ]
    res = ensemble_generate(gemma, smollm, reqs, mode="reranker")
    assert [len(r.candidates) for r in res] == [3, 2, 1]
    for r in res:
        scores = [c.reranker_score for c in r.candidates]
        assert r.chosen_index == max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert r.response == r.candidates[r.chosen_index].text
        assert set(r.timings_ms) >= {"generate", "score", "total"}
    # the reranker scores are the reranker's, not the generator's
    texts = [(reqs[0].instruction, "", c.text) for c in res[0].candidates]
    assert [c.reranker_score for c in res[0].candidates] == pytest.approx(
        score_candidates(smollm.model, smollm.tokenizer, texts, template="chat", max_seq_len=smollm.max_seq_len),
        abs=1e-5,
    )
    # a seed makes the candidates reproducible, whatever else is in the batch
    again = ensemble_generate(gemma, smollm, [reqs[0]], mode="generator")
    assert [c.token_ids for c in again[0].candidates] == [c.token_ids for c in res[0].candidates]
    assert again[0].candidates[0].reranker_score is None  # generator mode never calls the reranker
    greedy = ensemble_generate(gemma, smollm, reqs[:1], mode="reranker-greedy")
    assert len(greedy[0].candidates) == 1 and greedy[0].candidates[0].generator_logprob is None
    with pytest.raises(ValueError, match="needs a reranker"):
        ensemble_generate(gemma, None, reqs, mode="mix")


def test_modes_are_defined_once():
    from duetto.serve.config import EnsembleOptions
    from duetto.serve.schemas import GenerateRequest

    assert MODES == typing.get_args(Mode) == ("reranker", "mix", "generator", "consensus", "pmi", "combined",
                                              "reranker-greedy")
    assert typing.get_type_hints(EnsembleOptions)["mode"] == Mode
    assert typing.get_args(GenerateRequest.model_fields["mode"].annotation)[0] == Mode


def test_the_pipeline_runs_its_steps_by_mode():
    """run_ensemble with fake steps: which steps run, how scores land on candidates, what is timed."""
    calls = []

    async def generate(reqs):
        calls.append("generate")
        return [[Candidate("a", generator_logprob=-1.0), Candidate("b", generator_logprob=-2.0)] for _ in reqs], \
            CallInfo(requests=3, model_ms=5.0)

    async def greedy(reqs):
        calls.append("greedy")
        return [[Candidate("g", generator_logprob=-0.7)] for _ in reqs], None

    async def score(reqs, cands):
        calls.append("score")
        return [[-3.0, -1.0] for _ in cands], CallInfo(requests=2, model_ms=7.0)

    def run(mode, weight=0.5):
        calls.clear()
        return asyncio.run(run_ensemble([EnsembleRequest("q")], mode, weight, generate=generate, greedy=greedy,
                                        score=score))[0]  # fmt: skip

    r = run("reranker")
    assert calls == ["generate", "score"] and r.chosen_index == 1 and r.response == "b"
    assert [c.reranker_score for c in r.candidates] == [-3.0, -1.0]
    assert list(r.timings_ms) == ["generate", "generate_model", "score", "score_model", "total"]
    assert r.timings_ms["generate_model"] == 5.0 and r.batch == {"generator": 3, "reranker": 2}
    assert r.weight is None and r.to_dict()["candidates"][1] == {
        "text": "b", "generator_logprob": -2.0, "reranker_score": -1.0, "prior_score": None, "consensus": None,
        "tokens": 0, "finish_reason": "stop"}
    r = run("generator")
    assert calls == ["generate"] and r.chosen_index == 0 and "score" not in r.timings_ms
    assert run("mix", 1.0).weight == 1.0 and calls == ["generate", "score"]
    r = run("reranker-greedy")
    assert calls == ["greedy"] and r.batch == {} and "generate_model" not in r.timings_ms
    assert r.candidates[0].reranker_score == -0.7 and r.candidates[0].generator_logprob is None
    r = run("pmi", 1.0)  # the prior is scored with the same step, after an empty instruction
    assert calls == ["generate", "score", "score"] and "prior" in r.timings_ms and r.weight == 1.0
    assert r.batch == {"generator": 3, "reranker": 2, "reranker_prior": 2}
    r = run("consensus")
    assert calls == ["generate"] and "consensus" in r.timings_ms and r.candidates[0].consensus is not None
    with pytest.raises(ValueError, match="mode: one of"):
        run("best")
