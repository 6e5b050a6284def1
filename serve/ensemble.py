"""The ensemble: sample k candidates with one model, score them with a second, pick one.

``run_ensemble`` is the one pipeline (sample -> score -> choose). It is parameterised by its model
steps: the Serve ingress passes calls to the Generator and Reranker deployments, and
``ensemble_generate`` (the report, the naive benchmark) passes in-process calls on loaded models.
Both therefore produce the same candidates, scores and choice for the same seed. The generation
and scoring themselves live in ``duetto.trainers.inference``.

How one candidate is chosen (the modes, their features) is ``duetto.serve.selection``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from duetto.serve.merge import CallInfo
from duetto.serve.selection import check_mode, choose, consensus_scores, features_for, mode_params
from duetto.trainers.inference import Candidate, LoadedModel


@dataclass
class EnsembleRequest:
    instruction: str
    input: str = ""
    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    greedy_candidate: bool = False
    """The first of the k candidates is the generator's greedy answer; the others are sampled."""


@dataclass
class EnsembleResult:
    response: str
    candidates: list[Candidate]
    chosen_index: int
    mode: str
    weight: float | None = None
    """The weight of mode mix (the generator's) or pmi (the prior's); None in the other modes."""
    weights: dict[str, float] | None = None
    """Mode combined: each feature's weight."""
    timings_ms: dict[str, float] = field(default_factory=dict)
    """generate, score (when scored), total; ``<step>_model`` when a deployment timed its model call."""
    batch: dict[str, int] = field(default_factory=dict)
    """Requests in the deployment model call that served each step (Serve only)."""

    def to_dict(self) -> dict[str, Any]:
        """The body of a /v1/generate answer."""
        keys = ("text", "generator_logprob", "reranker_score", "prior_score", "consensus", "tokens", "finish_reason")
        out = {
            "response": self.response,
            "candidates": [{key: getattr(c, key) for key in keys} for c in self.candidates],
            "chosen_index": self.chosen_index,
            "mode": self.mode,
            "weight": self.weight,
            "timings_ms": {key: round(v, 2) for key, v in self.timings_ms.items()},
            "batch": self.batch,
        }
        if self.weights is not None:
            out["weights"] = self.weights
        return out


def needs_generator(mode: str) -> bool:
    return mode != "reranker-greedy"


def needs_reranker(mode: str, weights: Mapping[str, float] | None = None) -> bool:
    """The reranker model takes part: it scores (or, in reranker-greedy, answers)."""
    return mode == "reranker-greedy" or bool({"reranker", "prior"} & set(features_for(mode, weights)))


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

#: (requests) -> (candidates per request, the model call that served them or None in-process)
SampleStep = Callable[[Sequence[EnsembleRequest]], Awaitable[tuple[list[list[Candidate]], CallInfo | None]]]
#: (requests, their candidates) -> (reranker scores per request, the model call or None)
ScoreStep = Callable[
    [Sequence[EnsembleRequest], Sequence[Sequence[Candidate]]], Awaitable[tuple[list[list[float]], CallInfo | None]]
]


async def run_ensemble(
    requests: Sequence[EnsembleRequest],
    mode: str,
    weight: float,
    *,
    generate: SampleStep,
    greedy: SampleStep,
    score: ScoreStep,
    weights: Mapping[str, float] | None = None,
    features: Sequence[str] = (),
) -> list[EnsembleResult]:
    """Sample (``generate``; ``greedy`` = the reranker model alone in mode reranker-greedy), compute the
    features the mode reads (reranker scores with ``score``; the prior with ``score`` after an empty
    instruction; consensus from the texts) plus any named in ``features``, choose."""
    check_mode(mode, weights)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    batch: dict[str, int] = {}

    def record(step: str, who: str, call: CallInfo | None, since: float) -> None:
        timings[step] = (time.perf_counter() - since) * 1000.0
        if call is not None:
            timings[f"{step}_model"] = call.model_ms
            batch[who] = call.requests

    if mode == "reranker-greedy":
        cands, call = await greedy(requests)
        for cs in cands:  # the greedy answer's own mean log-prob is the reranker's view of it
            for c in cs:
                c.reranker_score, c.generator_logprob = c.generator_logprob, None
        record("generate", "reranker", call, t0)
    else:
        cands, call = await generate(requests)
        record("generate", "generator", call, t0)
    wanted = set(features_for(mode, weights)) | set(features) if mode != "reranker-greedy" else set()
    if "reranker" in wanted:
        t1 = time.perf_counter()
        scores, call = await score(requests, cands)
        for cs, ss in zip(cands, scores):
            for c, s in zip(cs, ss):
                c.reranker_score = s
        record("score", "reranker", call, t1)
    if "prior" in wanted:  # the same answers after an empty instruction: what any prompt would make likely
        t1 = time.perf_counter()
        blank = [dataclasses.replace(r, instruction="", input="") for r in requests]
        scores, call = await score(blank, cands)
        for cs, ss in zip(cands, scores):
            for c, s in zip(cs, ss):
                c.prior_score = s
        record("prior", "reranker_prior", call, t1)
    if "consensus" in wanted:
        t1 = time.perf_counter()
        for cs in cands:
            for c, s in zip(cs, consensus_scores([c.text for c in cs])):
                c.consensus = s
        timings["consensus"] = (time.perf_counter() - t1) * 1000.0
    timings["total"] = (time.perf_counter() - t0) * 1000.0
    params = mode_params(mode, weight, weights)
    results = []
    for cs in cands:
        j = choose(cs, mode, weight, weights)
        results.append(EnsembleResult(response=cs[j].text, candidates=cs, chosen_index=j, mode=mode,
                                      weight=params.get("weight"), weights=params.get("weights"),
                                      timings_ms=dict(timings), batch=dict(batch)))  # fmt: skip
    return results


# --------------------------------------------------------------------------------------------
# In-process steps
# --------------------------------------------------------------------------------------------


def _settings_groups(requests: Sequence[EnsembleRequest]) -> dict[tuple, list[int]]:
    """Requests that can share one generate call: equal max_new_tokens, temperature, top_p and
    greedy_candidate (k may differ). A seeded request samples alone, so its draws never depend on what
    it was batched with."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (r.max_new_tokens, r.temperature, r.top_p, r.greedy_candidate, i if r.seed is not None else None)
        groups.setdefault(key, []).append(i)
    return groups


def sample_requests(
    lm: LoadedModel, requests: Sequence[EnsembleRequest], *, greedy: bool = False
) -> list[list[Candidate]]:
    """Candidates for each request from ``lm``, one generate call per group of equal settings.
    greedy=True decodes one greedy answer per request (the reranker-greedy comparison mode)."""
    from duetto.trainers.inference import generate_candidates, prompt_text

    out: list[list[Candidate]] = [[] for _ in requests]
    for (max_new, temperature, top_p, greedy_first, _), idxs in _settings_groups(requests).items():
        prompts = [prompt_text(lm.tokenizer, lm.template, requests[i].instruction, requests[i].input) for i in idxs]
        cands = generate_candidates(
            lm.model, lm.tokenizer, prompts, [1 if greedy else requests[i].k for i in idxs],
            max_new_tokens=max_new, temperature=0.0 if greedy else temperature, top_p=top_p,
            seed=requests[idxs[0]].seed, stop_ids=lm.stop_ids, max_prompt_tokens=lm.max_seq_len, static=lm.static,
            greedy_first=greedy_first,
        )  # fmt: skip
        for i, cs in zip(idxs, cands):
            out[i] = cs
    return out


def score_requests(
    lm: LoadedModel,
    requests: Sequence[EnsembleRequest],
    candidates: Sequence[Sequence[Candidate]],
    *,
    batch_rows: int = 32,
) -> list[list[float]]:
    """Each request's candidates' scores under ``lm``: one padded scoring pass over all of them."""
    from duetto.trainers.inference import score_candidates

    pairs = [(r.instruction, r.input, c.text) for r, cs in zip(requests, candidates) for c in cs]
    flat = iter(score_candidates(lm.model, lm.tokenizer, pairs, template=lm.template, max_seq_len=lm.max_seq_len,
                                 batch_rows=batch_rows, static=lm.static_scoring))  # fmt: skip
    return [[next(flat) for _ in cs] for cs in candidates]


def _run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine whose awaits never suspend (the in-process steps), without an event
    loop, so this also works where one is already running (a notebook, a replica)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("an in-process ensemble step suspended")


def ensemble_generate(
    generator: LoadedModel | None,
    reranker: LoadedModel | None,
    requests: Sequence[EnsembleRequest],
    *,
    mode: str = "reranker",
    weight: float = 0.5,
    weights: Mapping[str, float] | None = None,
    features: Sequence[str] = (),
    score_rows: int = 32,
) -> list[EnsembleResult]:
    """The pipeline in one process, batched over ``requests``; the Serve ingress runs the same
    ``run_ensemble`` with deployment calls as its steps. ``features``: computed even when the mode
    does not read them (the report compares every mode on the same candidates)."""
    check_mode(mode, weights)
    if needs_generator(mode) and generator is None:
        raise ValueError(f"mode {mode} needs a generator")
    if (needs_reranker(mode, weights) or {"reranker", "prior"} & set(features)) and reranker is None:
        raise ValueError(f"mode {mode} needs a reranker")

    async def generate(reqs: Sequence[EnsembleRequest]) -> tuple[list[list[Candidate]], None]:
        assert generator is not None
        return sample_requests(generator, reqs), None

    async def greedy(reqs: Sequence[EnsembleRequest]) -> tuple[list[list[Candidate]], None]:
        assert reranker is not None
        return sample_requests(reranker, reqs, greedy=True), None

    async def score(reqs: Sequence[EnsembleRequest], cands: Sequence[Sequence[Candidate]]) -> tuple[list[list[float]], None]:
        assert reranker is not None
        return score_requests(reranker, reqs, cands, batch_rows=score_rows), None

    return _run_now(run_ensemble(requests, mode, weight, generate=generate, greedy=greedy, score=score,
                                 weights=weights, features=features))  # fmt: skip
