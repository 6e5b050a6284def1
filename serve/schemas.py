"""Request bodies of the HTTP API (pydantic, strict: "4" is not an integer, unknown fields are refused).

Range checks that depend on the served config (k and max_new_tokens limits, the context window)
happen in the ingress after parsing; the ones here are the same for every deployment. Every text
field is ``Text``: JSON may carry a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer can
encode, so it is refused here, naming the field, before any model code sees it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from duetto.serve.selection import Mode

_SEED_MAX = 2**63 - 1


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = f"U+{ord(value[e.start]):04X}"
        raise ValueError(f"not valid Unicode text: a lone surrogate ({bad}) at character {e.start}") from None
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


Text = Annotated[str, AfterValidator(_encodable)]
NonBlankText = Annotated[Text, AfterValidator(_non_blank)]


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
    """Duetto extension: the generator log-prob's weight in mode mix, the prior's in mode pmi."""
    greedy_candidate: bool | None = None
    """Duetto extension: the first candidate is the generator's greedy answer, the others sampled."""


class GenerateRequest(_Sampling):
    instruction: NonBlankText
    input: Text = ""
    k: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    """OpenAI /v1/completions: one string prompt; n candidates, the ensemble's pick is the one choice."""

    prompt: NonBlankText
    model: Text | None = None
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    user: Text | None = None
    """Accepted for compatibility (an end-user id); not used."""


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Sampling):
    """OpenAI /v1/chat/completions: system messages, then exactly one user turn (single-turn models)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: Text | None = None
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    user: Text | None = None
