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


def test_warm_up_compiles_the_decoding_buckets_only_when_asked(galore_trial):
    engine = _engine(galore_trial, "on", row_buckets=[2], length_buckets=[32], score_rows=4)
    assert set(engine.warm_up()) == {"2x32", "total"} and set(engine.lm.static._caches) == {(2, 32)}
    cold = _engine(galore_trial, "on", row_buckets=[2], length_buckets=[32], score_rows=4)
    # not warmed: a request that decodes anyway gets the dynamic cache, never a compile on the spot
    assert set(cold.warm_up(decoding=False)) == {"total"} and cold.lm.static is None
    assert len(cold.sample([EnsembleRequest("Hi", k=1, max_new_tokens=4, temperature=0.0)], greedy=True)[0]) == 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("adapter", "fold", "adapter: must be one of"), ("engine", "vllm", "engine: must be one of hf"),
     ("decoding.row_buckets", [], "row_buckets"), ("decoding.length_buckets", [8], "length_buckets"),
     ("decoding.static_cache", "maybe", "static_cache")],
)  # fmt: skip
def test_bad_engine_settings_name_the_key(key, value, message):
    data: dict = {}
    section, _, leaf = key.rpartition(".")
    (data.setdefault(section, {}) if section else data)[leaf] = value
    with pytest.raises((ConfigError, ValueError), match=message):
        from_dict(ServeConfig, data)
