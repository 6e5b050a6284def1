"""Request bodies of the HTTP API (pydantic, strict: "4" is not an integer, unknown fields are refused).

Range checks that depend on the served config (k and max_new_tokens limits, the context window)
happen in the ingress after parsing; the ones here are the same for every deployment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from duetto.serve.ensemble import Mode

_SEED_MAX = 2**63 - 1


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling(_Strict):
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    """0 = greedy (one candidate)."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=_SEED_MAX)
    mode: Mode | None = None
    """Duetto extension: override the configured scoring mode for this request."""
    weight: float | None = Field(default=None, ge=0.0, le=1.0)
    """Duetto extension: generator log-prob weight in mode=mix."""


class GenerateRequest(_Sampling):
    instruction: str
    input: str = ""
    k: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)

    _check_instruction = field_validator("instruction")(_non_blank)


class CompletionRequest(_Sampling):
    """OpenAI /v1/completions: one string prompt; n candidates, the ensemble's pick is the one choice."""

    prompt: str
    model: str | None = None
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    user: str | None = None
    """Accepted for compatibility (an end-user id); not used."""

    _check_prompt = field_validator("prompt")(_non_blank)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    """OpenAI /v1/chat/completions: system messages, then exactly one user turn (single-turn models)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    user: str | None = None
