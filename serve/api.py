"""The HTTP layer: the FastAPI app, its error shape, auth and body-size checks, and the helpers that
turn OpenAI-style bodies into ensemble requests and answers. The routes are the Ingress's methods
(serve/ingress.py).

Every 4xx/5xx answer is ``{"error": {"message", "type", "field", "param"}}``.
"""

# No `from __future__ import annotations`: FastAPI needs the real annotations of the handlers.
import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from duetto.serve.schemas import ChatCompletionRequest

log = logging.getLogger("duetto.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.field, self.kind = status, message, field, kind


def error_response(status: int, message: str, field: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:  # fmt: skip
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
    if first.get("type") == "string_unicode" and field is None:  # a key of the body holds a lone surrogate
        return error_response(422, "body: a field name is not valid Unicode text (a lone surrogate)", "body")
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


def authorized(request: Request, key: str) -> bool:
    """The request carries ``Authorization: Bearer <key>``, or no key is configured."""
    if not key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


@api.middleware("http")
async def _guard(request: Request, call_next: Any):
    """Bearer token on every route but /healthz (which says no more than ready/loading without it),
    and a body-size cap before anything is parsed."""
    # The settings live on this replica's Ingress (module globals are not shared with it: Ray ships
    # the ingress class by value).
    ingress = serve.get_replica_context().servable_object
    key, max_body = ingress.api_key, ingress.cfg.limits.max_body_bytes
    if _route_path(request).rstrip("/") != "/healthz" and not authorized(request, key):
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


def chat_instruction(body: ChatCompletionRequest) -> str:
    """System/developer messages, then exactly one user message, become one instruction (the models
    were fine-tuned on single-turn instructions, so a multi-turn history has no faithful prompt)."""
    system = [m.content for m in body.messages if m.role in ("system", "developer")]
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if any(m.role == "assistant" for m in body.messages) or len(users) != 1:
        message = "exactly one user message (plus optional system messages) is supported"
        raise ApiError(422, f"{message}: the models answer single-turn instructions", "messages")
    if users[0] != len(body.messages) - 1:
        raise ApiError(422, "the user message must be the last message", "messages")
    user = body.messages[users[0]].content
    if not user.strip():
        raise ApiError(422, "the user message must not be empty", "messages")
    return "\n\n".join([s for s in system if s.strip()] + [user])


def no_streaming(stream: bool) -> None:
    if stream:
        message = "streaming is not supported: the ensemble picks an answer only after all candidates finish"
        raise ApiError(422, message, "stream")


def usage(prompt_tokens: int, out: dict) -> dict:
    # every candidate was generated, so all of them count as completion tokens
    completion = sum(c["tokens"] for c in out["candidates"])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def extension(out: dict) -> dict:
    """The ``duetto`` block of an OpenAI-style answer: what the ensemble did."""
    keys = ("candidates", "chosen_index", "mode", "weight", "weights", "timings_ms", "batch")
    return {key: out[key] for key in keys if key in out}
