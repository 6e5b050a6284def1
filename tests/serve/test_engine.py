"""The engine boundary (serve/engine.py): the hf engine samples and scores exactly as the in-process
ensemble steps do, picks static-shape decoding by device and weights, and warms up what it uses."""

from __future__ import annotations

import pytest

from duetto.config import ConfigError, from_dict
from duetto.serve.config import DecodingOptions, ServeConfig
from duetto.serve.engine import ENGINES, HFEngine, load_hf, static_decoding_on
from duetto.serve.ensemble import EnsembleRequest, sample_requests, score_requests


def _engine(src, static_cache="auto", **decoding) -> HFEngine:
    opts = from_dict(DecodingOptions, {"static_cache": static_cache, **decoding})
    return load_hf(str(src), "", device="cpu", dtype="auto", quantize="auto", adapter="auto", context_cap=0,
                   allow_pickle=False, decoding=opts)  # fmt: skip


def test_cpu_auto_keeps_the_dynamic_cache_and_on_forces_static(galore_trial):
    auto = _engine(galore_trial)
    assert auto.lm.static is None and not static_decoding_on("auto", auto.lm)
    assert auto.info()["static_decoding"] is None and auto.info()["engine"] == "hf"
    forced = _engine(galore_trial, "on", row_buckets=[2, 8], length_buckets=[64, 128])
    assert forced.lm.static.rows == (2, 8) and forced.lm.static.lengths == (64, 128)
    assert forced.lm.static_scoring.rows == (2, 8) and auto.lm.static_scoring is None
    assert ENGINES["hf"] is load_hf


def test_engine_calls_are_the_ensemble_steps(galore_trial):
    engine = _engine(galore_trial, "on", row_buckets=[4, 8], length_buckets=[128])
    reqs = [EnsembleRequest("Name a prime.", k=2, max_new_tokens=6, temperature=0.0),
            EnsembleRequest("Say hi.", k=1, max_new_tokens=6, temperature=0.0)]  # fmt: skip
    got = engine.sample(reqs)
    engine.lm.static = None
    want = sample_requests(engine.lm, reqs)
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in want]
    flat = [x for xs in engine.score(reqs, got) for x in xs]
    assert flat == pytest.approx([x for xs in score_requests(engine.lm, reqs, got) for x in xs], abs=1e-5)


def test_whole_step_decoding_answers_what_generate_answers(galore_trial):
    reqs = [EnsembleRequest("Name a prime.", k=3, max_new_tokens=6, temperature=0.0)]
    steps = _engine(galore_trial, "on", row_buckets=[4], length_buckets=[128], whole_steps="on")
    plain = _engine(galore_trial, "on", row_buckets=[4], length_buckets=[128])
    assert steps.info()["static_decoding"]["whole_steps"] and not plain.info()["static_decoding"]["whole_steps"]
    got, want = steps.sample(reqs), plain.sample(reqs)
    assert list(steps.lm.static._steps) == [(4, 128)] and not plain.lm.static._steps
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in want]


def test_warm_up_compiles_the_decoding_and_scoring_buckets_only_when_asked(galore_trial):
    engine = _engine(galore_trial, "on", row_buckets=[2], length_buckets=[32], score_length_buckets=[16, 8192])
    top = 16 if engine.lm.max_seq_len <= 16 else 8192  # buckets past the model's max_seq_len are never warmed
    assert set(engine.warm_up()) == {"2x32", "score 2x16", f"score 2x{top}", "total"}
    assert set(engine.lm.static._caches) == {(2, 32)} and engine.info()["static_scoring"] == {"rows": [2], "lengths": [16, 8192]}
    cold = _engine(galore_trial, "on", row_buckets=[2], length_buckets=[32])
    # not warmed: a request that decodes or scores anyway gets the dynamic path, never a compile on the spot
    assert set(cold.warm_up(decoding=False, scoring=False)) == {"total"}
    assert cold.lm.static is None and cold.lm.static_scoring is None
    req = EnsembleRequest("Hi", k=1, max_new_tokens=4, temperature=0.0)
    cands = cold.sample([req], greedy=True)
    assert len(cands[0]) == 1 and len(cold.score([req], cands)[0]) == 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("adapter", "fold", "adapter: must be one of"), ("engine", "vllm", "engine: must be one of hf"),
     ("decoding.row_buckets", [], "row_buckets"), ("decoding.length_buckets", [8], "length_buckets"),
     ("decoding.static_cache", "maybe", "static_cache"), ("decoding.whole_steps", "yes", "whole_steps"), ("decoding.score_length_buckets", [8], "score_length_buckets")],
)  # fmt: skip
def test_bad_engine_settings_name_the_key(key, value, message):
    data: dict = {}
    section, _, leaf = key.rpartition(".")
    (data.setdefault(section, {}) if section else data)[leaf] = value
    with pytest.raises((ConfigError, ValueError), match=message):
        from_dict(ServeConfig, data)
