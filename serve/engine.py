"""The inference engine a model deployment runs: one loaded model that samples candidates and scores them.

A deployment (serve/replicas.py) only talks to an ``Engine``: ``sample`` and ``score`` take the
request dataclasses of serve/ensemble.py and return candidates and scores, ``warm_up`` runs before
the replica reports ready, ``info`` describes it for GET /v1/info. ``ENGINES`` maps the config's
``engine`` name to a loader; ``hf`` (transformers, CPU and GPU) is the one engine today. Another
(vLLM, SGLang) implements the same four methods on its own runtime and registers a loader here;
everything around it (batching, selection, the HTTP API) stays as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from duetto.serve.config import DecodingOptions
    from duetto.serve.ensemble import EnsembleRequest
    from duetto.trainers.inference import Candidate, LoadedModel

log = logging.getLogger("duetto.serve")


class Engine(Protocol):
    def sample(self, requests: Sequence[EnsembleRequest], *, greedy: bool = False) -> list[list[Candidate]]:
        """Each request's candidates (greedy: one greedy answer each)."""
        ...

    def score(self, requests: Sequence[EnsembleRequest], candidates: Sequence[Sequence[Candidate]]) -> list[list[float]]:
        """Mean log-likelihood per response token of each request's candidates."""
        ...

    def warm_up(self, decoding: bool = True, scoring: bool = True) -> dict[str, Any]:
        """Compile / allocate whatever a first request would otherwise pay for (``decoding``: the generate
        path, ``scoring``: the scoring path; a path not warmed still works, without compiled shapes);
        returns what it did."""
        ...

    def info(self) -> dict[str, Any]: ...


def static_decoding_on(setting: str, lm: LoadedModel) -> bool:
    """auto: static shapes on CUDA for plain (un-quantized) weights; bitsandbytes' 4/8-bit layers do
    not compile, and on CPU nothing compiles, so the dynamic cache serves those."""
    if setting != "auto":
        return setting == "on"
    return lm.model.device.type == "cuda" and not getattr(lm.model, "is_quantized", False)


def use_static_decoding(lm: LoadedModel, decoding: DecodingOptions) -> LoadedModel:
    """Give ``lm`` static-shape decoding and scoring when ``decoding.static_cache`` says so for its device
    and weights."""
    from duetto.trainers.inference import StaticDecoding, StaticScoring

    if static_decoding_on(decoding.static_cache, lm):
        lm.static = StaticDecoding(decoding.row_buckets, decoding.length_buckets,
                                   whole_steps=decoding.whole_steps == "on")
        lm.static_scoring = StaticScoring(decoding.row_buckets, decoding.score_length_buckets)
    return lm


class HFEngine:
    """transformers: ``duetto.trainers.inference`` (the same generation and scoring the trials' evaluation
    and `duetto report` run), with static-shape decoding and scoring on GPU (StaticDecoding, StaticScoring)."""

    name = "hf"

    def __init__(self, lm: LoadedModel, decoding: DecodingOptions):
        self.lm = use_static_decoding(lm, decoding)
        self.decoding = decoding
        self.warm_up_s: dict[str, float] = {}

    def sample(self, requests, *, greedy=False):
        from duetto.serve.ensemble import sample_requests

        return sample_requests(self.lm, requests, greedy=greedy)

    def score(self, requests, candidates):
        from duetto.serve.ensemble import score_requests

        return score_requests(self.lm, requests, candidates, batch_rows=self.decoding.score_rows)

    def warm_up(self, decoding=True, scoring=True):
        from duetto.serve.ensemble import EnsembleRequest
        from duetto.trainers.inference import Candidate

        t = time.perf_counter()
        self.warm_up_s = {}
        if not decoding:
            # a request that decodes here anyway (mode reranker-greedy asked per request) then uses the
            # dynamic cache: compiling a bucket inside a request would hold every other call for a minute
            self.lm.static = None
        elif self.lm.static is not None:
            self.warm_up_s.update(self.lm.static.warm_up(self.lm.model, self.lm.tokenizer, self.lm.stop_ids))
        if not scoring:
            self.lm.static_scoring = None  # as for decoding: never a compile inside a request
        elif self.lm.static_scoring is not None:
            self.warm_up_s.update(self.lm.static_scoring.warm_up(self.lm.model, self.lm.max_seq_len))
        else:  # the eager scoring kernels' first call (cuBLAS handles, allocator) at the largest batch
            self.score([EnsembleRequest("Hello")], [[Candidate("Hi.")] * self.decoding.score_rows])
        self.warm_up_s["total"] = round(time.perf_counter() - t, 2)
        log.info("%s warmed up in %.1f s: %s", self.lm.name, self.warm_up_s["total"], self.warm_up_s)
        return dict(self.warm_up_s)

    def info(self):
        static, scoring = self.lm.static, self.lm.static_scoring
        return {"engine": self.name, "model_class": type(self.lm.model).__name__,
                "static_decoding": {"rows": list(static.rows), "lengths": list(static.lengths),
                                    "whole_steps": static.whole_steps} if static else None,
                "static_scoring": {"rows": list(scoring.rows), "lengths": list(scoring.lengths)} if scoring else None,
                "warm_up_s": self.warm_up_s}  # fmt: skip


def load_hf(source: str, template: str, *, device: str, dtype: str, quantize: str, adapter: str, context_cap: int,
            allow_pickle: bool, decoding: DecodingOptions) -> HFEngine:  # fmt: skip
    from duetto.serve.loading import load_lm

    lm = load_lm(source, template, device=device, dtype=dtype, quantize=quantize, context_cap=context_cap,
                 allow_pickle=allow_pickle, adapter=adapter)  # fmt: skip
    return HFEngine(lm, decoding)


#: engine name (ServeConfig.engine) -> loader(source, template, **settings) -> Engine
ENGINES: dict[str, Callable[..., Engine]] = {"hf": load_hf}
