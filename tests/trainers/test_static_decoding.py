"""Static-shape decoding (trainers/inference.py StaticDecoding) computes what the dynamic cache does:
the same greedy tokens and log-probs, whatever bucket padding and chunking a call gets."""

from __future__ import annotations

import pytest

from duetto.trainers.inference import StaticDecoding, generate_candidates, prompt_text

QUESTIONS = ["What is the capital of France?", "Give a synonym for the word big.", "Name three colors.",
             "Summarize: plants need light and water."]  # fmt: skip


@pytest.fixture(scope="module", params=["gemma", "smollm"])
def lm(request):
    from duetto.serve.loading import load_lm

    return load_lm(str(request.getfixturevalue(f"tiny_{request.param}_dir")), "study", device="cpu")


def test_buckets_pad_rows_and_chunk_past_the_largest():
    static = StaticDecoding(rows=[8, 2, 4], lengths=[64, 32])
    assert static.rows == (2, 4, 8) and static.lengths == (32, 64)
    assert static.chunks(3) == [(0, 3, 4)]
    assert static.chunks(8) == [(0, 8, 8)]
    assert static.chunks(19) == [(0, 8, 8), (8, 16, 8), (16, 19, 4)]
    assert static.length_for(30) == 32 and static.length_for(33) == 64 and static.length_for(65) is None
    with pytest.raises(ValueError, match="buckets"):
        StaticDecoding(rows=[], lengths=[32])


def test_static_greedy_equals_dynamic(lm):
    prompts = [prompt_text(lm.tokenizer, lm.template, q) for q in QUESTIONS]
    # 4 prompts x greedy -> 4 rows: padded to 8 in one call, and chunked 2 + 2 with rows=(2,)
    for static in (StaticDecoding(rows=[8], lengths=[128]), StaticDecoding(rows=[2], lengths=[128])):
        dynamic = generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=8, temperature=0.0,
                                      stop_ids=lm.stop_ids)  # fmt: skip
        fixed = generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=8, temperature=0.0,
                                    stop_ids=lm.stop_ids, static=static)  # fmt: skip
        for a, b in zip(dynamic, fixed):
            assert a[0].token_ids == b[0].token_ids
            assert a[0].generator_logprob == pytest.approx(b[0].generator_logprob, abs=1e-4)
            assert a[0].finish_reason == b[0].finish_reason


def test_static_sampling_keeps_k_and_reuses_its_cache(lm):
    prompts = [prompt_text(lm.tokenizer, lm.template, q) for q in QUESTIONS[:3]]
    static = StaticDecoding(rows=[4, 16], lengths=[128])
    for _ in range(2):
        out = generate_candidates(lm.model, lm.tokenizer, prompts, [2, 1, 3], max_new_tokens=6, temperature=0.8,
                                  seed=3, stop_ids=lm.stop_ids, static=static)  # fmt: skip
        assert [len(c) for c in out] == [2, 1, 3]
        assert all(1 <= c.tokens <= 6 for cs in out for c in cs)
    assert list(static._caches) == [(16, 128)]  # 6 rows -> the 16-row bucket, one cache reused


def test_static_greedy_candidate_equals_dynamic(lm):
    """greedy_first on static shapes: the bucket's padding rows are not greedy rows, and each prompt's
    first candidate is the greedy answer the dynamic cache gives."""
    prompts = [prompt_text(lm.tokenizer, lm.template, q) for q in QUESTIONS[:3]]
    static = StaticDecoding(rows=[4, 16], lengths=[128])
    greedy = generate_candidates(lm.model, lm.tokenizer, prompts, 1, max_new_tokens=8, temperature=0.0,
                                 stop_ids=lm.stop_ids)  # fmt: skip
    out = generate_candidates(lm.model, lm.tokenizer, prompts, [2, 1, 3], max_new_tokens=8, temperature=0.8,
                              seed=3, stop_ids=lm.stop_ids, static=static, greedy_first=True)  # fmt: skip
    assert [cs[0].token_ids for cs in out] == [g[0].token_ids for g in greedy]


def test_too_long_for_every_bucket_falls_back_to_the_dynamic_cache(lm):
    prompt = prompt_text(lm.tokenizer, lm.template, QUESTIONS[0])
    static = StaticDecoding(rows=[4], lengths=[8])
    out = generate_candidates(lm.model, lm.tokenizer, [prompt], 1, max_new_tokens=8, temperature=0.0,
                              stop_ids=lm.stop_ids, static=static)  # fmt: skip
    ref = generate_candidates(lm.model, lm.tokenizer, [prompt], 1, max_new_tokens=8, temperature=0.0,
                              stop_ids=lm.stop_ids)  # fmt: skip
    assert out[0][0].token_ids == ref[0][0].token_ids and not static._caches


def test_warm_up_fills_every_bucket(lm):
    static = StaticDecoding(rows=[2, 4], lengths=[16, 32])
    times = static.warm_up(lm.model, lm.tokenizer, lm.stop_ids)
    assert set(times) == {"2x16", "4x16", "2x32", "4x32"}
    assert set(static._caches) == {(2, 16), (4, 16), (2, 32), (4, 32)}


def test_decoding_without_logprobs_gives_the_same_answers(lm):
    from duetto.trainers.inference import greedy_decode

    prompts = [prompt_text(lm.tokenizer, lm.template, q) for q in QUESTIONS]
    with_lp = greedy_decode(lm.model, lm.tokenizer, prompts, max_new_tokens=8, max_prompt_tokens=None, batch_size=3)
    without = greedy_decode(lm.model, lm.tokenizer, prompts, max_new_tokens=8, max_prompt_tokens=None, batch_size=3,
                            logprobs=False)  # fmt: skip
    assert [c.token_ids for c in with_lp] == [c.token_ids for c in without]
    assert [c.text for c in with_lp] == [c.text for c in without]
    assert all(c.generator_logprob is None for c in without) and all(c.generator_logprob < 0 for c in with_lp)


ANSWERS = ["Paris.", "Large, huge or vast.", "Red, green and a rather long list of other colours: blue, teal, ochre.",
           "They need light and water.", "Rayleigh scattering."]  # fmt: skip


def _pairs():
    return [(q, "", a) for q, a in zip(QUESTIONS, ANSWERS)]


def test_static_scoring_pads_rows_and_tokens_and_scores_what_eager_scores(lm):
    from duetto.trainers.inference import StaticScoring, score_candidates

    pairs = _pairs()
    kw = dict(template=lm.template, max_seq_len=lm.max_seq_len)
    eager = score_candidates(lm.model, lm.tokenizer, pairs, batch_rows=2, **kw)
    # 4 rows -> one 8-row forward (4 copies dropped); rows 2 at a time (chunked by the largest bucket)
    for static, shapes in ((StaticScoring(rows=[8], lengths=[128]), {(8, 128)}),
                           (StaticScoring(rows=[2], lengths=[64, 128]), {(2, 64)})):
        seen = []
        run = static.hidden
        static.hidden = lambda decoder, ids, mask, run=run: seen.append(tuple(ids.shape)) or run(decoder, ids, mask)
        got = score_candidates(lm.model, lm.tokenizer, pairs, batch_rows=32, static=static, **kw)
        assert got == pytest.approx(eager, abs=1e-4)
        assert set(seen) == shapes  # every forward went through the padded path, at a bucket's shape
    assert StaticScoring(rows=[2, 8], lengths=[64]).shape_for(3, 40) == (8, 64)
    assert StaticScoring(rows=[2], lengths=[64]).shape_for(3, 65) is None  # longer than every bucket: eager
    # too long for every bucket: the eager forward, same scores
    short = score_candidates(lm.model, lm.tokenizer, pairs, batch_rows=32, static=StaticScoring([8], [16]), **kw)
    assert short == pytest.approx(eager, abs=1e-4)


def test_static_scoring_warm_up_runs_the_buckets_the_model_can_use(lm):
    from duetto.trainers.inference import StaticScoring

    static = StaticScoring(rows=[2, 4], lengths=[16, 32, 4096])
    times = static.warm_up(lm.model, 24)
    assert set(times) == {"score 2x16", "score 4x16", "score 2x32", "score 4x32"}
