"""Whole-step decoding (trainers/decode_steps.py) computes what transformers' ``generate`` computes:
the same greedy tokens and log-probabilities, the same top-p nucleus, log-probabilities of sampled
tokens equal to a teacher-forced forward's, stop ids and min_new_tokens honoured. On CPU the step
runs eagerly; the compiled CUDA path has its test in test_static_decoding_gpu.py."""

from __future__ import annotations

import pytest
import torch

from duetto.trainers.decode_steps import plain_sampling, sample_next
from duetto.trainers.inference import StaticDecoding, generate_candidates, prompt_text

QUESTIONS = ["What is the capital of France?", "Give a synonym for the word big.", "Name three colors.",
             "Summarize: plants need light and water."]  # fmt: skip


@pytest.fixture(scope="module", params=["gemma", "smollm"])
def lm(request):
    from duetto.serve.loading import load_lm

    return load_lm(str(request.getfixturevalue(f"tiny_{request.param}_dir")), "study", device="cpu")


def _prompts(lm, n=4):
    return [prompt_text(lm.tokenizer, lm.template, q) for q in QUESTIONS[:n]]


def test_greedy_equals_generate(lm):
    prompts = _prompts(lm)
    reference = generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=10, temperature=0.0,
                                    stop_ids=lm.stop_ids)  # fmt: skip
    steps = StaticDecoding(rows=[8], lengths=[128], whole_steps=True)
    ours = generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=10, temperature=0.0,
                               stop_ids=lm.stop_ids, static=steps)  # fmt: skip
    assert list(steps._steps) == [(8, 128)]  # the whole-step path ran, not generate
    for a, b in zip(reference, ours):
        assert a[0].token_ids == b[0].token_ids
        assert a[0].generator_logprob == pytest.approx(b[0].generator_logprob, abs=1e-4)
        assert a[0].finish_reason == b[0].finish_reason


def test_sampled_logprobs_equal_a_teacher_forced_forward_and_greedy_first_stays_greedy(lm):
    prompts = _prompts(lm, 3)
    steps = StaticDecoding(rows=[16], lengths=[128], whole_steps=True)
    out = generate_candidates(lm.model, lm.tokenizer, prompts, 3, max_new_tokens=8, temperature=0.8, top_p=0.9,
                              seed=5, stop_ids=lm.stop_ids, static=steps, greedy_first=True)  # fmt: skip
    greedy = generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=8, temperature=0.0,
                                 stop_ids=lm.stop_ids)  # fmt: skip
    from duetto.data.prompts import encode_prompt

    for prompt, cands, best in zip(prompts, out, greedy):
        assert cands[0].token_ids == best[0].token_ids
        assert len({tuple(c.token_ids) for c in cands}) > 1  # the others sample
        ids = encode_prompt(prompt, lm.tokenizer, lm.max_seq_len)
        for c in cands:
            seq = torch.tensor([ids + c.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(input_ids=seq).logits[0].float(), -1)
            chosen = [logp[len(ids) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
            assert c.generator_logprob == pytest.approx(sum(chosen) / len(chosen), abs=1e-4)


def test_same_seed_same_candidates(lm):
    steps = StaticDecoding(rows=[8], lengths=[128], whole_steps=True)
    runs = [generate_candidates(lm.model, lm.tokenizer, _prompts(lm, 2), 2, max_new_tokens=6, temperature=1.0,
                                seed=11, stop_ids=lm.stop_ids, static=steps) for _ in range(2)]  # fmt: skip
    assert [[c.token_ids for c in cs] for cs in runs[0]] == [[c.token_ids for c in cs] for cs in runs[1]]


def test_top_p_nucleus_and_temperature_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    temperature, top_p = 0.7, 0.8
    reference = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    allowed = torch.isfinite(reference)
    rows = logits.shape[0]
    draws = torch.zeros_like(allowed)
    for _ in range(400):
        token, logp = sample_next(logits, torch.full((rows, 1), temperature), torch.full((rows, 1), top_p),
                                  torch.zeros(rows, dtype=torch.bool), torch.tensor([3]), torch.tensor(True))  # fmt: skip
        draws[torch.arange(rows), token] = True
        assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1))
    assert not (draws & ~allowed).any()  # never outside the nucleus
    assert (draws == allowed).float().mean() > 0.95  # and it covers it


def test_the_nucleus_cumsum_traces_as_one_opaque_op():
    """Compiled, the step calls duetto::cumsum_last (aten's kernel), never inductor's own scan."""
    from duetto.trainers.decode_steps import cumsum_last

    x = torch.rand(5, 4099)
    assert torch.allclose(cumsum_last(x), x.cumsum(-1))
    graphs = []

    def collect(gm, inputs):  # a backend that keeps the traced graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    traced = torch.compile(sample_next, backend=collect, fullgraph=True)
    logits = torch.randn(3, 64)
    greedy = torch.tensor([True, False, True])
    args = (torch.full((3, 1), 0.7), torch.full((3, 1), 0.9), greedy, torch.tensor([3]), torch.tensor(True))
    token, logp = traced(logits, *args)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert any("duetto.cumsum_last" in t for t in targets), targets
    assert not any(t.endswith("cumsum") for t in targets), targets
    assert torch.equal(token[greedy], logits.argmax(-1)[greedy])
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1))


def test_stops_pad_the_rest_and_min_new_tokens_forbids_them(lm):
    prompts = _prompts(lm, 2)
    steps = StaticDecoding(rows=[4], lengths=[64], whole_steps=True)
    # every token is a stop id except one: rows stop at their first token...
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    stop_all = [t for t in range(vocab) if t != 7]
    out = generate_candidates(lm.model, lm.tokenizer, prompts, 2, max_new_tokens=6, temperature=1.0, seed=1,
                              stop_ids=stop_all, static=steps)  # fmt: skip
    assert all(c.finish_reason == "stop" and c.tokens == 1 or c.token_ids[0] == 7 for cs in out for c in cs)
    # ...unless min_new_tokens forbids stop ids until then: only token 7 is left to draw
    out = generate_candidates(lm.model, lm.tokenizer, prompts, 2, max_new_tokens=6, min_new_tokens=6,
                              temperature=1.0, seed=1, stop_ids=stop_all, static=steps)  # fmt: skip
    assert all(c.token_ids == [7] * 6 and c.finish_reason == "length" for cs in out for c in cs)


def test_a_generation_config_with_processors_of_its_own_keeps_generate(lm):
    assert plain_sampling(lm.model)
    saved = lm.model.generation_config.repetition_penalty
    lm.model.generation_config.repetition_penalty = 1.3
    try:
        assert not plain_sampling(lm.model)
        steps = StaticDecoding(rows=[4], lengths=[128], whole_steps=True)
        generate_candidates(lm.model, lm.tokenizer, _prompts(lm, 1), 1, max_new_tokens=4, temperature=0.0,
                            stop_ids=lm.stop_ids, static=steps)  # fmt: skip
        assert not steps._steps and list(steps._caches) == [(4, 128)]  # generate decoded it
    finally:
        lm.model.generation_config.repetition_penalty = saved
