"""Request bodies: text that a tokenizer cannot encode is refused at parsing, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from duetto.serve.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

LONE = "ok \ud800 ok"  # a lone UTF-16 surrogate: valid JSON ("\ud800"), not encodable as UTF-8
USER = {"role": "user", "content": "hi"}

TEXT_FIELDS = [
    # (model, body with one bad text field, its location)
    (GenerateRequest, {"instruction": LONE}, ("instruction",)),
    (GenerateRequest, {"instruction": "hi", "input": LONE}, ("input",)),
    (CompletionRequest, {"prompt": LONE}, ("prompt",)),
    (CompletionRequest, {"prompt": "hi", "model": LONE}, ("model",)),
    (CompletionRequest, {"prompt": "hi", "user": LONE}, ("user",)),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": LONE}]}, ("messages", 0, "content")),
    (ChatCompletionRequest, {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": LONE}]},
     ("messages", 1, "content")),  # fmt: skip
    (ChatCompletionRequest, {"messages": [USER], "model": LONE}, ("model",)),
    (ChatCompletionRequest, {"messages": [USER], "user": LONE}, ("user",)),
]


@pytest.mark.parametrize("model,body,loc", TEXT_FIELDS, ids=[f"{t[0].__name__}-{'.'.join(map(str, t[2]))}" for t in TEXT_FIELDS])
def test_a_lone_surrogate_is_refused_in_every_text_field(model, body, loc):
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    (err,) = e.value.errors()
    assert err["loc"] == loc and "surrogate" in err["msg"]
    "".join(map(str, err["loc"])).encode("utf-8")  # the error itself can be sent


def test_other_unicode_is_text():
    body = GenerateRequest.model_validate({"instruction": "naïve 𝄞 日本 \U0001f600", "input": ""})
    assert body.instruction.startswith("naïve")
