"""The Ingress deployment: validates each request, runs the ensemble pipeline over the Generator and
Reranker deployments, and answers in the HTTP API's shapes.

    Ingress (FastAPI)  ──handle──►  Generator: samples k candidates   (@serve.batch)
          │            ──handle──►  Reranker:  scores every candidate (@serve.batch)
          └── serve.ensemble.run_ensemble picks one and answers

Every request is validated before any model sees it (types, limits, prompt length in the models'
own tokens), so a bad request costs a 4xx and never a replica. Back-pressure comes from
``max_queued_requests``: the proxy answers 503 when the ingress queue is full, and the ingress turns
a full model queue (``BackPressureError``) into 503 as well. A model replica that dies under a
request (killed, out of memory) costs that request one retry, which Serve routes to a live or
restarted replica, then a 503, never a 500.
"""

# No `from __future__ import annotations`: Ray ships the ingress to its replicas in a way that
# leaves string annotations unresolvable, and FastAPI then cannot see the request models.
# Everything the Ingress methods use is defined or imported above the class: Ray serializes the
# class when the decorators run, at import, so names defined later here would be missing in the replica.
import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from duetto.config import from_dict
from duetto.serve.api import ApiError, api, authorized, chat_instruction, extension, no_streaming, usage
from duetto.serve.config import ServeConfig
from duetto.serve.ensemble import EnsembleRequest, needs_generator, needs_reranker, run_ensemble
from duetto.serve.merge import CallInfo
from duetto.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest
from duetto.trainers.inference import Candidate, count_prompt_tokens, stop_suffix_tokens

HEALTH_TIMEOUT_S = 5.0

log = logging.getLogger("duetto.serve")


async def call_deployment(call: Callable[[], Awaitable[Any]], who: str) -> Any:
    """``await call()`` (a handle call). A full queue is 503 at once. A replica that died under the
    request (RayActorError: ActorDiedError, ActorUnavailableError) is retried once: Serve's router has
    dropped the dead replica, so the retry goes to a live one or waits for its restart; a second
    death is 503. Generation and scoring are stateless, so a retry is safe."""
    for attempt in (1, 2):
        try:
            return await call()
        except BackPressureError:
            raise ApiError(503, f"the {who} is at capacity (queue full); retry shortly", None, "overloaded") from None
        except RayActorError as e:
            if attempt == 2:
                message = f"the {who} replica stopped twice while serving this request ({type(e).__name__})"
                raise ApiError(503, f"{message}; retry shortly", None, "unavailable") from None
            log.warning("the %s replica stopped while serving a request (%s); retrying once", who, type(e).__name__)


def _call_info(outs: list[dict]) -> CallInfo:
    """The deployment model calls that answered ``outs`` (one per request), as one CallInfo."""
    return CallInfo(requests=max(o["batch_requests"] for o in outs), model_ms=max(o["model_ms"] for o in outs))


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: Any, reranker: Any, settings: dict):
        from duetto.serve.loading import prompting_info

        self.generator = generator
        self.reranker = reranker
        self.cfg: ServeConfig = from_dict(ServeConfig, settings)
        cap = self.cfg.limits.max_context_tokens
        # Tokenizers only (no weights): prompt lengths are checked in each model's own tokens.
        self.gen_info = prompting_info(self.cfg.generator, self.cfg.generator_template, cap)
        self.rer_info = prompting_info(self.cfg.reranker, self.cfg.reranker_template, cap)
        self.api_key = self.cfg.resolved_api_key()
        self.created = int(time.time())

    # ---- validation --------------------------------------------------------------------------

    def _settings(self, body: Any, instruction: str, input: str, k: int | None, max_new: int | None, k_field: str,
                  max_field: str, prompt_field: str) -> tuple[EnsembleRequest, str, float, int]:  # fmt: skip
        """The request's settings over the configured defaults, checked against the limits and each
        model's context; also the prompt's length in tokens (the longer of the two models' counts)."""
        ens, lim = self.cfg.ensemble, self.cfg.limits
        k = ens.k if k is None else k
        max_new = ens.max_new_tokens if max_new is None else max_new
        mode = body.mode or ens.mode
        if body.weight is not None and mode not in ("mix", "pmi"):
            raise ApiError(422, f"weight is only used with mode mix or pmi (mode here is {mode})", "weight")
        if mode == "combined" and not ens.weights:
            raise ApiError(422, "mode combined needs ensemble.weights in the serve config (duetto report fits them)",
                           "mode")  # fmt: skip
        if k > lim.max_k:
            raise ApiError(422, f"{k_field} = {k} is above the limit {lim.max_k}", k_field)
        if max_new > lim.max_new_tokens:
            raise ApiError(422, f"{max_field} = {max_new} is above the limit {lim.max_new_tokens}", max_field)
        checks = [("generator", self.gen_info, max_new)] if needs_generator(mode) else []
        if needs_reranker(mode, ens.weights):  # it scores or answers; scoring appends the stop token(s)
            stop = stop_suffix_tokens(self.rer_info.tokenizer, self.rer_info.template)
            checks.append(("reranker", self.rer_info, max_new + stop))
        prompt_tokens = 0
        for name, info, budget in checks:
            n = count_prompt_tokens(info.tokenizer, info.template, instruction, input)
            prompt_tokens = max(prompt_tokens, n)
            if n + budget > info.context:
                message = f"prompt is {n} tokens for the {name}; with {max_field} = {max_new} it exceeds the context"
                raise ApiError(422, f"{message} of {info.context} tokens", prompt_field)
        temperature = ens.temperature if body.temperature is None else body.temperature
        top_p = ens.top_p if body.top_p is None else body.top_p
        greedy = ens.greedy_candidate if body.greedy_candidate is None else body.greedy_candidate
        request = EnsembleRequest(instruction, input, k, max_new, temperature, top_p, body.seed, greedy)
        return request, mode, ens.weight if body.weight is None else body.weight, prompt_tokens

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model_name:
            message = f"model {model!r} is not served here; GET /v1/models lists {self.cfg.model_name!r}"
            raise ApiError(404, message, "model", "model_not_found")

    # ---- the pipeline's steps: deployment calls ----------------------------------------------

    @staticmethod
    async def _call_each(method: Any, who: str, payloads: list[dict]) -> list[dict]:
        """One deployment call per request, concurrently (the deployment batches them)."""
        return await asyncio.gather(*(call_deployment(functools.partial(method.remote, p), who) for p in payloads))

    async def _sample(self, method: str, who: str, requests: list) -> tuple:
        handle = getattr(self.generator if who == "generator" else self.reranker, method)
        outs = await self._call_each(handle, who, [asdict(r) for r in requests])
        return [[Candidate(**c) for c in o["candidates"]] for o in outs], _call_info(outs)

    async def _score(self, requests: list, candidates: list) -> tuple:
        payloads = [{"instruction": r.instruction, "input": r.input, "texts": [c.text for c in cs]}
                    for r, cs in zip(requests, candidates)]  # fmt: skip
        outs = await self._call_each(self.reranker.score, "reranker", payloads)
        return [o["scores"] for o in outs], _call_info(outs)

    async def _ensemble(self, request: EnsembleRequest, mode: str, weight: float,
                        weights: dict[str, float] | None = None) -> dict:  # fmt: skip
        (result,) = await run_ensemble(
            [request], mode, weight,
            generate=functools.partial(self._sample, "generate", "generator"),
            greedy=functools.partial(self._sample, "greedy", "reranker"),
            score=self._score, weights=weights,
        )  # fmt: skip
        return result.to_dict()

    # ---- routes ------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self, request: Request) -> JSONResponse:
        try:
            gen, rer = await asyncio.wait_for(
                asyncio.gather(self.generator.info.remote("generator"), self.reranker.info.remote("reranker")),
                HEALTH_TIMEOUT_S,
            )
        except Exception as e:  # not loaded yet, restarting, or gone: not ready either way
            status, body = 503, {"status": "loading", "detail": type(e).__name__}
        else:
            status, body = 200, {"status": "ready", "generator": gen, "reranker": rer}
        if not authorized(request, self.api_key):  # it needs no token, so without one: no model paths
            body = {"status": body["status"]}
        return JSONResponse(status_code=status, content=body)

    @api.get("/v1/models")
    async def models(self) -> dict:
        model = {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "duetto",
                 "generator": self.cfg.generator, "reranker": self.cfg.reranker, "mode": self.cfg.ensemble.mode}
        return {"object": "list", "data": [model]}

    @api.post("/v1/generate")
    async def generate(self, body: GenerateRequest) -> dict:
        request, mode, weight, _ = self._settings(body, body.instruction, body.input, body.k, body.max_new_tokens,
                                                  "k", "max_new_tokens", "instruction")  # fmt: skip
        return await self._ensemble(request, mode, weight, self.cfg.ensemble.weights)

    async def _openai_answer(self, body: Any, instruction: str, max_new: int | None, max_field: str,
                             prompt_field: str, kind: str, choice: Callable[[str], dict]) -> dict:  # fmt: skip
        """An OpenAI-style answer (``kind``: its object) of the ensemble's pick; ``choice(response)``
        is the route's own part of the one choice."""
        request, mode, weight, prompt_tokens = self._settings(body, instruction, "", body.n, max_new, "n", max_field,
                                                              prompt_field)  # fmt: skip
        out = await self._ensemble(request, mode, weight, self.cfg.ensemble.weights)
        finish_reason = out["candidates"][out["chosen_index"]]["finish_reason"]
        return {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.cfg.model_name,
            "choices": [{**choice(out["response"]), "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, out),
            "duetto": extension(out),
        }

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> dict:
        self._check_model(body.model)
        no_streaming(body.stream)
        return await self._openai_answer(body, body.prompt, body.max_tokens, "max_tokens", "prompt", "text_completion",
                                         lambda text: {"text": text, "index": 0})  # fmt: skip

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> dict:
        self._check_model(body.model)
        no_streaming(body.stream)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(422, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        instruction = chat_instruction(body)
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await self._openai_answer(
            body, instruction, body.max_completion_tokens or body.max_tokens, max_field, "messages", "chat.completion",
            lambda text: {"index": 0, "message": {"role": "assistant", "content": text}},
        )  # fmt: skip
