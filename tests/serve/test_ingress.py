"""The ingress's deployment calls, with fake handles (no Ray cluster): a replica that dies under a
request is retried once, then answered 503, never 500."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from duetto.serve.api import ApiError
from duetto.serve.ensemble import EnsembleRequest
from duetto.serve.ingress import Ingress

ANSWER = {"candidates": [{"text": "hi", "generator_logprob": -1.0, "tokens": 1, "finish_reason": "stop"}],
          "batch_requests": 1, "model_ms": 1.0}  # fmt: skip
SCORES = {"scores": [-0.5], "batch_requests": 1, "model_ms": 1.0}


class _Method:
    """``handle.<method>``: ``.remote(x)`` gives an awaitable that raises the next queued error, else answers."""

    def __init__(self, errors: list, answer: dict):
        self.errors, self.answer, self.calls = list(errors), answer, 0

    def remote(self, *request: dict):
        self.calls += 1
        error = self.errors.pop(0) if self.errors else None

        async def response():
            if error is not None:
                raise error
            return self.answer

        return response()


class _Handle:
    def __init__(self, errors: list = ()):
        self.generate = _Method(errors, ANSWER)
        self.greedy = _Method(errors, ANSWER)
        self.score = _Method(errors, SCORES)
        self.info = _Method(errors, {"source": "/home/me/models/secret-trial"})


def _ingress(generator: _Handle, reranker: _Handle):
    # the class the routes are defined on (under Serve's ASGI wrapper), without loading tokenizers
    ingress = object.__new__(Ingress.func_or_class.__bases__[0])
    ingress.generator, ingress.reranker = generator, reranker
    return ingress


DIED = [
    pytest.param(lambda: ActorDiedError(), id="ActorDiedError"),
    pytest.param(lambda: ActorUnavailableError("replica unreachable", None), id="ActorUnavailableError"),
    pytest.param(lambda: RayActorError(), id="RayActorError"),
]


@pytest.mark.parametrize("died", DIED)
def test_a_request_whose_replica_died_is_retried_once(died):
    gen, rer = _Handle([died()]), _Handle([died()])
    ing = _ingress(gen, rer)
    out = asyncio.run(ing._ensemble(EnsembleRequest("hi", k=1), "reranker", 0.5))
    assert out["response"] == "hi" and out["candidates"][0]["reranker_score"] == -0.5
    assert gen.generate.calls == 2 and rer.score.calls == 2


@pytest.mark.parametrize("died", DIED)
@pytest.mark.parametrize("who", ["generator", "reranker"])
def test_a_second_death_is_503_with_retry_after(died, who):
    handles = {"generator": _Handle(), "reranker": _Handle()}
    handles[who] = _Handle([died(), died()])
    ing = _ingress(handles["generator"], handles["reranker"])
    with pytest.raises(ApiError) as e:
        asyncio.run(ing._ensemble(EnsembleRequest("hi", k=1), "reranker", 0.5))
    assert e.value.status == 503 and e.value.kind == "unavailable" and who in e.value.message
    method = handles[who].generate if who == "generator" else handles[who].score
    assert method.calls == 2  # retried once, not more


def test_a_full_queue_is_503_at_once_and_other_errors_stay_errors():
    gen = _Handle([BackPressureError(num_queued_requests=4, max_queued_requests=4)])
    with pytest.raises(ApiError) as e:
        asyncio.run(_ingress(gen, _Handle())._ensemble(EnsembleRequest("hi", k=1), "generator", 0.5))
    assert (e.value.status, e.value.kind, gen.generate.calls) == (503, "overloaded", 1)
    gen = _Handle([RuntimeError("CUDA out of memory")])  # a model error: not retried, the API's 500
    with pytest.raises(RuntimeError):
        asyncio.run(_ingress(gen, _Handle())._ensemble(EnsembleRequest("hi", k=1), "generator", 0.5))
    assert gen.generate.calls == 1


@pytest.mark.parametrize("key,header,details", [
    ("k3y", None, False), ("k3y", "Bearer wrong", False), ("k3y", "Bearer k3y", True), ("", None, True),
])  # fmt: skip
@pytest.mark.parametrize("died", [False, True], ids=["ready", "loading"])
def test_healthz_shows_model_paths_only_to_the_key_holder(key, header, details, died):
    import json

    from starlette.requests import Request

    ing = _ingress(_Handle([ActorDiedError()] if died else []), _Handle())
    ing.api_key = key
    headers = [(b"authorization", header.encode())] if header else []
    r = asyncio.run(ing.healthz(Request({"type": "http", "method": "GET", "path": "/healthz", "headers": headers})))
    body = json.loads(r.body)
    assert (r.status_code, body["status"]) == ((503, "loading") if died else (200, "ready"))
    assert (len(body) > 1) == details
    assert ("secret-trial" in r.body.decode()) == (details and not died)
