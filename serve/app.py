"""The Ray Serve app: Generator and Reranker deployments, and a FastAPI ingress that calls both.

    Ingress (FastAPI)  ──handle──►  Generator: samples k candidates   (@serve.batch)
          │            ──handle──►  Reranker:  scores every candidate (@serve.batch)
          └── picks one with ensemble.choose and answers

The ingress validates every request before any model sees it (types, limits, prompt length in the
models' own tokens), so a bad request costs a 4xx and never a replica. Back-pressure comes from
``max_queued_requests``: the proxy answers 503 when the ingress queue is full, and the ingress turns
a full model queue (``BackPressureError``) into 503 as well.

``build_app`` is the import path a Serve config file names (``duetto.serve.app:build_app``);
``app_from_config`` and ``start`` are what `duetto serve` and the tests use.
"""

# No `from __future__ import annotations` here: Ray ships the ingress to its replicas in a way that
# leaves string annotations unresolvable, and FastAPI then cannot see the request models.
import asyncio
import hmac
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from duetto.config import apply_overrides, from_dict, read_yaml, to_dict
from duetto.serve.config import DeploymentOptions, ServeConfig
from duetto.serve.merge import PARK_SLOTS
from duetto.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

log = logging.getLogger("duetto.serve")

HEALTH_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------------------------
# Model deployments
# --------------------------------------------------------------------------------------------


class _ParkedBatchesFilter(logging.Filter):
    """Drops Ray's warning that max_batch_size x max_concurrent_batches exceeds max_ongoing_requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("max_concurrent_batches" in msg and "max_ongoing_requests" in msg)


#: Set in a request dict whose caller has gone (see _ModelReplica._batched).
_CLIENT_GONE = "_duetto_client_gone"


class _ModelReplica:
    """Loads one model for a replica; sync model calls run in a worker thread under one lock, so the
    event loop keeps accepting requests (and forming the next batch) while the model computes. The
    batches formed meanwhile are parked and merged into the next call (serve/merge.py)."""

    def _load(self, source: str, template: str, quantize: str, dtype: str, context_cap: int) -> None:
        import ray

        from duetto.serve.loading import inspect_saved, load_lm, pick_device

        t0 = time.perf_counter()
        # the GPUs Ray actually assigned, so a Serve config file's ray_actor_options decide too
        self.device = pick_device(bool(ray.get_gpu_ids()))
        self.lm = load_lm(source, template, device=self.device, dtype=dtype, quantize=quantize, context_cap=context_cap)
        self.spec = inspect_saved(source)
        self._lock = threading.Lock()
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s (%s, template=%s) on %s in %.1f s", source, type(self.lm.model).__name__, self.lm.template,
                 self.device, self.load_s)  # fmt: skip

    def _configure_batching(self, method: Any, opts: dict, run: Any) -> Any:
        """Serve's batching settings for ``method``, and the MergedCalls its batches share the model through."""
        from duetto.serve.merge import MergedCalls

        method.set_max_batch_size(int(opts["max_batch_size"]))
        method.set_batch_wait_timeout_s(float(opts["batch_wait_timeout_s"]))
        # Ray warns that max_batch_size x max_concurrent_batches exceeds max_ongoing_requests; parked
        # batches never run side by side (see serve/merge.py), so the warning does not apply here.
        serve_log = logging.getLogger("ray.serve")
        if not any(isinstance(f, _ParkedBatchesFilter) for f in serve_log.filters):
            serve_log.addFilter(_ParkedBatchesFilter())
        return MergedCalls(run, int(opts["max_batch_size"]), dropped=lambda item: item.get(_CLIENT_GONE, False))

    @staticmethod
    async def _batched(method: Any, request: dict) -> dict:
        """``await method(request)``; a request whose caller goes away is marked, so that the model call
        that takes it from the parked batches skips it (Serve itself only skips it when a batch starts)."""
        try:
            return await method(request)
        except asyncio.CancelledError:
            request[_CLIENT_GONE] = True
            raise

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def info(self) -> dict:
        return {
            "source": self.lm.name,
            "adapter": self.spec.adapter,
            "method": self.spec.method,
            "template": self.lm.template,
            "device": self.device,
            "context": self.lm.max_seq_len,
            "load_s": round(self.load_s, 2),
        }


def _answer(call: Any, **fields: Any) -> dict:
    """One request's answer from a model call (``call``: its merge.CallInfo)."""
    return {**fields, "batch_requests": call.requests, "model_ms": call.model_ms}


def _requests_from(items: list[dict]):
    from duetto.serve.ensemble import EnsembleRequest

    # without the gone-mark, which a caller may set while its request is already in a model call
    return [EnsembleRequest(**{key: v for key, v in item.items() if key != _CLIENT_GONE}) for item in items]


@serve.deployment(name="Generator")
class Generator(_ModelReplica):
    def __init__(self, source: str, template: str, quantize: str, dtype: str, context_cap: int, options: dict):
        from duetto.serve.ensemble import sample_requests

        self._load(source, template, quantize, dtype, context_cap)
        self._generate_merged = self._configure_batching(
            self._generate_batch, options, lambda items: self._in_thread(sample_requests, self.lm, _requests_from(items))
        )

    async def generate(self, request: dict) -> dict:
        """One request ({instruction, input, k, max_new_tokens, temperature, top_p, seed}) -> its candidates."""
        return await self._batched(self._generate_batch, request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=PARK_SLOTS)
    async def _generate_batch(self, items: list[dict]) -> list[dict]:
        cands, call = await self._generate_merged(items)
        # None: a request whose caller has gone, skipped by the model call (nobody reads its answer)
        return [None if cs is None else _answer(call, candidates=[c.to_dict() for c in cs]) for cs in cands]


@serve.deployment(name="Reranker")
class Reranker(_ModelReplica):
    def __init__(self, source: str, template: str, quantize: str, dtype: str, context_cap: int, options: dict):
        from duetto.serve.ensemble import sample_requests

        self._load(source, template, quantize, dtype, context_cap)
        self._score_merged = self._configure_batching(self._score_batch, options, self._score_items)
        self._greedy_merged = self._configure_batching(
            self._greedy_batch,
            options,
            lambda items: self._in_thread(lambda: sample_requests(self.lm, _requests_from(items), greedy=True)),
        )

    async def score(self, request: dict) -> dict:
        """{instruction, input, texts: [...]} -> {scores: [...]}: mean log-likelihood per response token."""
        return await self._batched(self._score_batch, request)

    async def greedy(self, request: dict) -> dict:
        """The reranker-greedy comparison mode: the reranker model answers on its own, greedily."""
        return await self._batched(self._greedy_batch, request)

    async def _score_items(self, items: list[dict]) -> list[list[float]]:
        """One padded scoring pass over every text of every item -> each item's scores."""
        from duetto.serve.ensemble import score_candidates

        pairs = [(it["instruction"], it.get("input", ""), text) for it in items for text in it["texts"]]
        flat = await self._in_thread(
            lambda: score_candidates(
                self.lm.model, self.lm.tokenizer, pairs, template=self.lm.template, max_seq_len=self.lm.max_seq_len
            )
        )
        out, i = [], 0
        for it in items:
            out.append(flat[i : i + len(it["texts"])])
            i += len(it["texts"])
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=PARK_SLOTS)
    async def _score_batch(self, items: list[dict]) -> list[dict]:
        scores, call = await self._score_merged(items)
        return [None if s is None else _answer(call, scores=s) for s in scores]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=PARK_SLOTS)
    async def _greedy_batch(self, items: list[dict]) -> list[dict]:
        cands, call = await self._greedy_merged(items)
        return [None if cs is None else _answer(call, candidates=[c.to_dict() for c in cs]) for cs in cands]


# --------------------------------------------------------------------------------------------
# Errors: every 4xx/5xx is {"error": {"message", "type", "field", "param"}}
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind


def error_response(
    status: int,
    message: str,
    field: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "field": field, "param": field}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _field_of(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


api = FastAPI(title="duetto ensemble", description="Generate k candidates with one model, pick the best with another.")


@api.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, f"body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", "body")
    field = _field_of(first.get("loc", ()))
    if first.get("type") == "model_attributes_type" or (field is None and first.get("type") != "missing"):
        return error_response(400, "body must be a JSON object", "body")
    if first.get("type") == "missing" and field is None:
        return error_response(400, "body is required (a JSON object)", "body")
    detail = "; ".join(f"{_field_of(e.get('loc', ()))}: {e['msg']}" for e in errors[:5])
    return error_response(422, detail, field)


@api.exception_handler(ApiError)
async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return error_response(exc.status, exc.message, exc.field, exc.kind, headers)


@api.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), None, kind)


@api.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # a model deployment failed (e.g. out of memory): say so in the API's error shape, log the cause
    log.exception("request %s failed", request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error")


def _route_path(request: Request) -> str:
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


@api.middleware("http")
async def _guard(request: Request, call_next: Any):
    """Bearer token on every route but /healthz, and a body-size cap before anything is parsed."""
    # The settings live on this replica's Ingress (module globals are not shared with it: Ray ships
    # the class by value).
    ingress = serve.get_replica_context().servable_object
    key, max_body = ingress.api_key, ingress.cfg.limits.max_body_bytes
    if _route_path(request).rstrip("/") != "/healthz" and key:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return error_response(
                401, "missing or wrong bearer token (Authorization: Bearer <key>)", "Authorization",
                "authentication_error", {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
    if request.method in ("POST", "PUT", "PATCH"):
        length = request.headers.get("content-length")
        if length is None:
            return error_response(411, "Content-Length is required", "Content-Length")
        if not length.isdigit() or int(length) > max_body:
            return error_response(413, f"body larger than {max_body} bytes", "body")
    return await call_next(request)


# --------------------------------------------------------------------------------------------
# Ingress
# --------------------------------------------------------------------------------------------

# Everything the Ingress methods use is defined above the class: Ray serializes the class when the
# decorators run, at import, so names defined later in this module would be missing in the replica.


def _chat_instruction(body: ChatCompletionRequest) -> str:
    """System/developer messages, then exactly one user message, become one instruction (the models
    were fine-tuned on single-turn instructions, so a multi-turn history has no faithful prompt)."""
    system = [m.content for m in body.messages if m.role in ("system", "developer")]
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if any(m.role == "assistant" for m in body.messages) or len(users) != 1:
        raise ApiError(
            422,
            "exactly one user message (plus optional system messages) is supported: the models answer single-turn instructions",
            "messages",
        )
    if users[0] != len(body.messages) - 1:
        raise ApiError(422, "the user message must be the last message", "messages")
    user = body.messages[users[0]].content
    if not user.strip():
        raise ApiError(422, "the user message must not be empty", "messages")
    return "\n\n".join([s for s in system if s.strip()] + [user])


def _usage(prompt_tokens: int, out: dict) -> dict:
    # every candidate was generated, so all of them count as completion tokens
    completion = sum(c["tokens"] for c in out["candidates"])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _extension(out: dict) -> dict:
    return {key: out[key] for key in ("candidates", "chosen_index", "mode", "weight", "timings_ms", "batch")}


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

    def _settings(self, *, instruction: str, input: str, k: int | None, max_new: int | None, temperature: float | None,
                  top_p: float | None, seed: int | None, mode: str | None, weight: float | None,
                  k_field: str, max_field: str, prompt_field: str) -> tuple[dict, str, float, int]:  # fmt: skip
        from duetto.serve.ensemble import (
            count_prompt_tokens,
            needs_generator,
            needs_reranker_scores,
            stop_suffix_tokens,
        )

        ens, lim = self.cfg.ensemble, self.cfg.limits
        k = ens.k if k is None else k
        max_new = ens.max_new_tokens if max_new is None else max_new
        mode = mode or ens.mode
        if weight is not None and mode != "mix":
            raise ApiError(422, f"weight is only used with mode=mix (mode here is {mode})", "weight")
        weight = ens.weight if weight is None else weight
        if k > lim.max_k:
            raise ApiError(422, f"{k_field} = {k} is above the limit {lim.max_k}", k_field)
        if max_new > lim.max_new_tokens:
            raise ApiError(422, f"{max_field} = {max_new} is above the limit {lim.max_new_tokens}", max_field)
        checks = []
        if needs_generator(mode):
            checks.append(("generator", self.gen_info, max_new))
        if needs_reranker_scores(mode) or mode == "reranker-greedy":
            # scoring appends the stop token(s) after the response
            checks.append(
                (
                    "reranker",
                    self.rer_info,
                    max_new + stop_suffix_tokens(self.rer_info.tokenizer, self.rer_info.template),
                )
            )
        prompt_tokens = 0
        for name, info, budget in checks:
            n = count_prompt_tokens(info.tokenizer, info.template, instruction, input)
            prompt_tokens = max(prompt_tokens, n)
            if n + budget > info.context:
                raise ApiError(
                    422,
                    f"prompt is {n} tokens for the {name}; with {max_field} = {max_new} it exceeds the "
                    f"context of {info.context} tokens",
                    prompt_field,
                )
        request = {
            "instruction": instruction,
            "input": input,
            "k": k,
            "max_new_tokens": max_new,
            "temperature": ens.temperature if temperature is None else temperature,
            "top_p": ens.top_p if top_p is None else top_p,
            "seed": seed,
        }
        return request, mode, weight, prompt_tokens

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model_name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; GET /v1/models lists {self.cfg.model_name!r}",
                "model",
                "model_not_found",
            )

    # ---- the pipeline ------------------------------------------------------------------------

    async def _call(self, response: Any, who: str) -> Any:
        try:
            return await response
        except BackPressureError:
            raise ApiError(503, f"the {who} is at capacity (queue full); retry shortly", None, "overloaded") from None

    async def _ensemble(self, request: dict, mode: str, weight: float) -> dict:
        from duetto.serve.ensemble import Candidate, choose, needs_reranker_scores

        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        batch: dict[str, int] = {}
        if mode == "reranker-greedy":
            out = await self._call(self.reranker.greedy.remote(request), "reranker")
            cands = [Candidate(**c) for c in out["candidates"]]
            for c in cands:  # its own mean token log-prob is the reranker's view of its answer
                c.reranker_score, c.generator_logprob = c.generator_logprob, None
            timings["generate"] = (time.perf_counter() - t0) * 1000.0
            timings["generate_model"] = out["model_ms"]
            batch["reranker"] = out["batch_requests"]
        else:
            out = await self._call(self.generator.generate.remote(request), "generator")
            cands = [Candidate(**c) for c in out["candidates"]]
            timings["generate"] = (time.perf_counter() - t0) * 1000.0
            timings["generate_model"] = out["model_ms"]
            batch["generator"] = out["batch_requests"]
        if needs_reranker_scores(mode):
            t1 = time.perf_counter()
            scored = await self._call(
                self.reranker.score.remote(
                    {"instruction": request["instruction"], "input": request["input"], "texts": [c.text for c in cands]}
                ),
                "reranker",
            )
            for c, s in zip(cands, scored["scores"]):
                c.reranker_score = s
            timings["score"] = (time.perf_counter() - t1) * 1000.0
            timings["score_model"] = scored["model_ms"]
            batch["reranker"] = scored["batch_requests"]
        j = choose(cands, mode, weight)
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        return {
            "response": cands[j].text,
            "candidates": [
                {
                    "text": c.text,
                    "generator_logprob": c.generator_logprob,
                    "reranker_score": c.reranker_score,
                    "tokens": c.tokens,
                    "finish_reason": c.finish_reason,
                }
                for c in cands
            ],  # fmt: skip
            "chosen_index": j,
            "mode": mode,
            "weight": weight if mode == "mix" else None,
            "timings_ms": {key: round(v, 2) for key, v in timings.items()},
            "batch": batch,
        }

    # ---- routes ------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            gen, rer = await asyncio.wait_for(
                asyncio.gather(self.generator.info.remote(), self.reranker.info.remote()), HEALTH_TIMEOUT_S
            )
        except Exception as e:  # not loaded yet, restarting, or gone: not ready either way
            return JSONResponse(status_code=503, content={"status": "loading", "detail": type(e).__name__})
        return JSONResponse(content={"status": "ready", "generator": gen, "reranker": rer})

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.cfg.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "duetto",
                    "generator": self.cfg.generator,
                    "reranker": self.cfg.reranker,
                    "mode": self.cfg.ensemble.mode,
                }
            ],
        }

    @api.post("/v1/generate")
    async def generate(self, body: GenerateRequest) -> dict:
        request, mode, weight, _ = self._settings(
            instruction=body.instruction, input=body.input, k=body.k, max_new=body.max_new_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, mode=body.mode, weight=body.weight,
            k_field="k", max_field="max_new_tokens", prompt_field="instruction",
        )  # fmt: skip
        return await self._ensemble(request, mode, weight)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> dict:
        self._check_model(body.model)
        if body.stream:
            raise ApiError(
                422,
                "streaming is not supported: the ensemble picks an answer only after all candidates finish",
                "stream",
            )
        request, mode, weight, prompt_tokens = self._settings(
            instruction=body.prompt, input="", k=body.n, max_new=body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, mode=body.mode, weight=body.weight,
            k_field="n", max_field="max_tokens", prompt_field="prompt",
        )  # fmt: skip
        out = await self._ensemble(request, mode, weight)
        chosen = out["candidates"][out["chosen_index"]]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.cfg.model_name,
            "choices": [
                {"text": out["response"], "index": 0, "logprobs": None, "finish_reason": chosen["finish_reason"]}
            ],
            "usage": _usage(prompt_tokens, out),
            "duetto": _extension(out),
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> dict:
        self._check_model(body.model)
        if body.stream:
            raise ApiError(
                422,
                "streaming is not supported: the ensemble picks an answer only after all candidates finish",
                "stream",
            )
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(422, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        instruction = _chat_instruction(body)
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        request, mode, weight, prompt_tokens = self._settings(
            instruction=instruction, input="", k=body.n, max_new=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, mode=body.mode, weight=body.weight,
            k_field="n", max_field=max_field, prompt_field="messages",
        )  # fmt: skip
        out = await self._ensemble(request, mode, weight)
        chosen = out["candidates"][out["chosen_index"]]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.cfg.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["response"]},
                    "logprobs": None,
                    "finish_reason": chosen["finish_reason"],
                }
            ],
            "usage": _usage(prompt_tokens, out),
            "duetto": _extension(out),
        }


# --------------------------------------------------------------------------------------------
# Building and starting the app
# --------------------------------------------------------------------------------------------


def _deploy_options(o: DeploymentOptions) -> dict:
    return {
        "num_replicas": o.num_replicas,
        "ray_actor_options": {"num_cpus": o.num_cpus, "num_gpus": o.num_gpus},
        "max_ongoing_requests": o.max_ongoing_requests,
        "max_queued_requests": o.max_queued_requests,
    }


def resolve_sources(cfg: ServeConfig) -> ServeConfig:
    """Fill generator/reranker from ``from_sweep`` where not named; check both are given."""
    if cfg.from_sweep:
        from duetto.serve.loading import models_from_sweep

        gen, rer = models_from_sweep(cfg.from_sweep)
        cfg.generator = cfg.generator or gen
        cfg.reranker = cfg.reranker or rer
    cfg.require_models()
    from duetto.serve.loading import inspect_saved

    for name in ("generator", "reranker"):  # a missing dir fails here, naming the key, before Ray starts
        try:
            inspect_saved(getattr(cfg, name))
        except Exception as e:
            from duetto.config import ConfigError

            raise ConfigError(f"{name}: {e}") from None
    return cfg


def app_from_config(cfg: ServeConfig):
    """The bound Serve application (nothing starts until serve.run)."""
    cfg = resolve_sources(cfg)
    # Absolute paths: replicas may start in another working directory (e.g. `serve deploy`).
    for name in ("generator", "reranker"):
        p = Path(getattr(cfg, name)).expanduser()
        if p.exists():
            setattr(cfg, name, str(p.resolve()))
    cap = cfg.limits.max_context_tokens
    gen_opts, rer_opts = cfg.generator_deployment, cfg.reranker_deployment
    generator = Generator.options(**_deploy_options(gen_opts)).bind(
        cfg.generator, cfg.generator_template, cfg.quantize, cfg.dtype, cap, to_dict(gen_opts)
    )
    reranker = Reranker.options(**_deploy_options(rer_opts)).bind(
        cfg.reranker, cfg.reranker_template, cfg.quantize, cfg.dtype, cap, to_dict(rer_opts)
    )
    ing = cfg.ingress_deployment
    return Ingress.options(
        num_replicas=ing.num_replicas,
        ray_actor_options={"num_cpus": ing.num_cpus},
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
    ).bind(generator, reranker, to_dict(cfg))


def config_from_args(args: dict | None) -> ServeConfig:
    """Builder args -> ServeConfig: ``config`` names a YAML to start from, ``overrides`` is a list of
    ``key=value``; other keys are ServeConfig fields (sections as mappings, or dotted keys)."""
    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", []) or [])
    data = read_yaml(path) if path else {}
    for key, value in args.items():
        if "." in key:
            overrides.append(f"{key}={value}")
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data = apply_overrides(data, overrides)
    return from_dict(ServeConfig, data)


def build_app(args: dict | None = None):
    """Application builder for Serve config files: ``import_path: duetto.serve.app:build_app``."""
    return app_from_config(config_from_args(args))


def http_options(cfg: ServeConfig) -> dict:
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s}


def start(cfg: ServeConfig) -> str:
    """Run the app on the connected Ray (serve.run returns once every replica has loaded its model);
    returns the base URL."""
    serve.start(http_options=http_options(cfg))
    serve.run(app_from_config(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
