"""On CUDA the static-shape decoding step is compiled and replayed as CUDA graphs: it must still
decode what the dynamic cache decodes (fp32, so compiled and eager kernels agree to rounding). So
must whole decoding steps (trainers/decode_steps.py), and a seed must give the same samples on every
replay."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from duetto.trainers.inference import StaticDecoding, generate_candidates, prompt_text  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Give a synonym for the word big.", "Name three colors.",
             "Summarize: plants need light and water.", "Why is the sky blue?"]  # fmt: skip


def _greedy(lm, prompts, static=None):
    return generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=12, temperature=0.0,
                               stop_ids=lm.stop_ids, static=static)  # fmt: skip


def _assert_replays_decode(lm, prompts, static, reference) -> None:
    """``static``'s greedy answers, recorded then replayed, are ``reference``'s tokens and log-probs."""
    for _ in range(2):  # the second call replays what the first recorded
        for a, b in zip(reference, _greedy(lm, prompts, static)):
            assert a[0].token_ids == b[0].token_ids
            assert a[0].generator_logprob == pytest.approx(b[0].generator_logprob, abs=1e-3)


@pytest.mark.parametrize("which", ["gemma", "smollm"])
def test_compiled_static_greedy_equals_dynamic_on_cuda(which, request):
    from duetto.serve.loading import load_lm

    lm = load_lm(str(request.getfixturevalue(f"tiny_{which}_dir")), "study", device="cuda", dtype="float32")
    prompts = [prompt_text(lm.tokenizer, lm.template, q) for q in QUESTIONS]
    static = StaticDecoding(rows=[2, 8], lengths=[128])
    static.warm_up(lm.model, lm.tokenizer, lm.stop_ids)
    _assert_replays_decode(lm, prompts, static, _greedy(lm, prompts))
    assert set(static._caches) == {(2, 128), (8, 128)}


@pytest.mark.parametrize("which", ["gemma", "smollm"])
def test_compiled_whole_steps_equal_generate_on_cuda(which, request):
    from duetto.serve.loading import load_lm

    lm = load_lm(str(request.getfixturevalue(f"tiny_{which}_dir")), "study", device="cuda", dtype="float32")
    prompts = [prompt_text(lm.tokenizer, lm.template, q) for q in QUESTIONS]
    steps = StaticDecoding(rows=[2, 8], lengths=[128], whole_steps=True)
    steps.warm_up(lm.model, lm.tokenizer, lm.stop_ids)
    assert set(steps._steps) == {(2, 128), (8, 128)}
    reference = _greedy(lm, prompts)
    _assert_replays_decode(lm, prompts, steps, reference)
    sampled = [generate_candidates(lm.model, lm.tokenizer, prompts[:2], 4, max_new_tokens=12, temperature=0.8,
                                   top_p=0.95, seed=3, stop_ids=lm.stop_ids, static=steps, greedy_first=True)
               for _ in range(2)]  # fmt: skip
    assert [[c.token_ids for c in cs] for cs in sampled[0]] == [[c.token_ids for c in cs] for cs in sampled[1]]
    assert [cs[0].token_ids for cs in sampled[0]] == [cs[0].token_ids for cs in reference[:2]]


@pytest.mark.parametrize("which", ["gemma", "smollm"])
def test_compiled_static_scoring_equals_eager_on_cuda(which, request):
    from duetto.serve.loading import load_lm
    from duetto.trainers.inference import StaticScoring, score_candidates

    lm = load_lm(str(request.getfixturevalue(f"tiny_{which}_dir")), "study", device="cuda", dtype="float32")
    pairs = [(q, "", f"An answer of {i * 7} words about {q.lower()}") for i, q in enumerate(QUESTIONS)]
    kw = dict(template=lm.template, max_seq_len=lm.max_seq_len)
    eager = score_candidates(lm.model, lm.tokenizer, pairs, **kw)
    static = StaticScoring(rows=[2, 8], lengths=[64, 128])
    static.warm_up(lm.model, lm.max_seq_len)
    for _ in range(2):  # the second call replays what the first recorded
        assert score_candidates(lm.model, lm.tokenizer, pairs, static=static, **kw) == pytest.approx(eager, abs=1e-3)
        assert score_candidates(lm.model, lm.tokenizer, pairs[:2], static=static, **kw) == pytest.approx(eager[:2], abs=1e-3)


def test_compiled_sampling_at_a_real_vocabulary_on_cuda():
    """128 rows x SmolLM2's 49,152 columns: the size at which inductor's own scan code failed to build."""
    from duetto.trainers.decode_steps import cumsum_last, sample_next

    torch.manual_seed(0)
    rows, vocab = 128, 49152
    logits = torch.randn(rows, vocab, device="cuda") * 4
    # the nucleus's cumulative probabilities, compiled as in a decoding step, equal eager torch's
    ranked = (logits / 0.7).sort(-1).values
    nucleus = torch.compile(lambda s: cumsum_last(s.softmax(-1)), mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        compiled_cumulative = nucleus(ranked)
    assert torch.allclose(compiled_cumulative, ranked.softmax(-1).cumsum(-1), atol=1e-5)
    # the whole sampling step: greedy rows take the argmax, the others sample inside the nucleus
    temperature, top_p = torch.full((rows, 1), 0.7, device="cuda"), torch.full((rows, 1), 0.95, device="cuda")
    greedy = torch.arange(rows, device="cuda") % 2 == 0
    args = (temperature, top_p, greedy, torch.tensor([2], device="cuda"), torch.tensor(True, device="cuda"))
    compiled = torch.compile(sample_next, mode="reduce-overhead")
    for _ in range(3):
        token, logp = compiled(logits, *args)
    argmax = logits.argmax(-1)
    assert torch.equal(token[greedy], argmax[greedy])
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1), atol=1e-4)
    scores = logits / temperature
    ranked, order = scores.sort(-1)
    keep = ~(ranked.softmax(-1).cumsum(-1) <= 1 - top_p)
    allowed = keep.scatter(1, order, keep)
    assert allowed.gather(1, token[:, None]).all()  # never outside the top-p nucleus
    assert (token[~greedy] != argmax[~greedy]).any()  # and not shrunk to the top token
