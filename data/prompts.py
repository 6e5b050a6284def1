"""Prompt templates, tokenization and label masks: the one place that decides what a model sees.

Templates: ``study`` (``Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:\n{response}``,
no Input block when the input is empty; the response ends with EOS) and ``chat`` (the model's own chat
template, one user message; the response ends with the template's end-of-turn token, else EOS).

Labels: prompt tokens and padding are -100; the response and its stop token are learned. Prompt and
response are tokenized separately and concatenated, so the boundary is exact; the tokenizer's BOS
goes in front once (not when the prompt text already starts with it, as Gemma's chat template does).

Truncation has one rule for prompts, in training and at inference (``cut_prompt``): keep the BOS
and the prompt's *tail*, because the end of the prompt holds the cue the response follows. A
training example (``encode_pair``) cuts the prompt first, keeping at least a quarter of
``max_seq_len``; a response longer than what is left loses its tail, and the stop token is still
appended so every example teaches at least one token (an all -100 row would give a NaN loss).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Sequence

TEMPLATES = ("study", "chat")
IGNORE_INDEX = -100

_SENTINEL = "DUETTOxRESPONSExSENTINEL"
_tokenizer_cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")


def _has_input(input: str | None) -> bool:
    return bool(input and input.strip())


def build_prompt(instruction: str, input: str = "", *, template: str = "study", tokenizer: Any = None) -> str:
    """The prompt text, up to where the response starts."""
    _check_template(template)
    if template == "study":
        if _has_input(input):
            return f"Instruction:\n{instruction}\n\nInput:\n{input}\n\nResponse:\n"
        return f"Instruction:\n{instruction}\n\nResponse:\n"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None)
        raise ValueError(f"template 'chat' needs a tokenizer with a chat template (tokenizer: {name!r})")
    content = f"{instruction}\n\n{input}" if _has_input(input) else instruction
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def _chat_turn_end(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant message, if any."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # a template that cannot render an assistant turn: fall back to EOS
        return None
    at = text.find(_SENTINEL)
    if at < 0:
        return None
    tail = text[at + len(_SENTINEL) :]
    specials = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values()}
    matches = [t for t in specials if t and tail.startswith(t)]
    return max(matches, key=len) if matches else None


def _cache(tokenizer) -> dict:
    """Per-tokenizer memo (encode_* run once per example; these answers only change with the tokenizer)."""
    try:
        return _tokenizer_cache.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        return {}


def response_end(tokenizer, template: str = "study") -> str:
    """Text appended after a response so the model learns to stop (EOS, or the chat end-of-turn)."""
    _check_template(template)
    key = ("end", template, getattr(tokenizer, "chat_template", None), tokenizer.eos_token)
    memo = _cache(tokenizer)
    if key not in memo:
        end = _chat_turn_end(tokenizer) if template == "chat" else None
        end = end or tokenizer.eos_token
        if not end:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end a response with")
        memo[key] = end
    return memo[key]


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts in front of every text (Gemma: [<bos>]; SmolLM2: [])."""
    key = ("prefix", tokenizer.bos_token_id)
    memo = _cache(tokenizer)
    if key not in memo:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        # where the plain ids start inside the special ones (0, no prefix, when they never do)
        starts = range(len(with_special) - len(plain) + 1)
        at = next((i for i in starts if with_special[i : i + len(plain)] == plain), 0)
        memo[key] = list(with_special[:at])
    return list(memo[key])


def encode_prompt(prompt: str, tokenizer, max_tokens: int | None = None) -> list[int]:
    """Prompt ids exactly as training puts them before the response (BOS added once), cut to at most
    ``max_tokens`` by ``cut_prompt`` when given.

    Generation must use this: tokenizing a study prompt with ``add_special_tokens=False`` loses
    Gemma's BOS, tokenizing a chat prompt with it doubles BOS, and ``ids[-n:]`` drops BOS.
    """
    ids = _with_prefix(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), tokenizer)
    return ids if max_tokens is None else cut_prompt(ids, tokenizer, max_tokens)


def _with_prefix(ids: list[int], tokenizer) -> list[int]:
    """Prompt ids with the tokenizer's special prefix (BOS) in front once."""
    prefix = _special_prefix(tokenizer)
    return prefix + ids if prefix and ids[: len(prefix)] != prefix else ids


def _head(ids: list[int], tokenizer) -> int:
    """How many leading ids are the tokenizer's special prefix (BOS), which a cut never removes."""
    prefix = _special_prefix(tokenizer)
    return len(prefix) if prefix and ids[: len(prefix)] == prefix else 0


def cut_prompt(ids: list[int], tokenizer, max_tokens: int) -> list[int]:
    """The one truncation rule for prompt ids: BOS (when present) + the last ids, ``max_tokens`` in all."""
    if len(ids) <= max_tokens:
        return ids
    head = _head(ids, tokenizer)
    keep = max(0, max_tokens - head)
    return ids[:head] + (ids[len(ids) - keep :] if keep else [])


def encode_pair(prompt: str, response: str, tokenizer, *, template: str = "study", max_seq_len: int = 128) -> dict:
    """Ids, attention mask and labels of ``prompt + response + stop`` (unpadded python lists).

    Also ``prompt_len`` (prompt tokens kept) and ``truncated`` (the prompt or response was cut).
    """
    prompt_ids = encode_prompt(prompt, tokenizer)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
    return _assemble(prompt_ids, response_ids, tokenizer, template, max_seq_len)


def _stop_ids(tokenizer, template: str) -> list[int]:
    key = ("stop", template, getattr(tokenizer, "chat_template", None), tokenizer.eos_token)
    memo = _cache(tokenizer)
    if key not in memo:
        memo[key] = list(tokenizer(response_end(tokenizer, template), add_special_tokens=False)["input_ids"])
    return list(memo[key])


def _assemble(prompt_ids: list[int], response_ids: list[int], tokenizer, template: str, max_seq_len: int) -> dict:
    """``encode_pair``'s result from the prompt's ids (BOS in front) and the response's ids."""
    stop_ids = _stop_ids(tokenizer, template)
    head = _head(prompt_ids, tokenizer)
    if max_seq_len < head + len(stop_ids) + 1:
        raise ValueError(f"max_seq_len={max_seq_len} leaves no room for a prompt (BOS + stop token need {head + len(stop_ids)})")

    truncated = len(prompt_ids) + len(response_ids) + len(stop_ids) > max_seq_len
    if truncated:
        room = max_seq_len - head - len(response_ids) - len(stop_ids)  # prompt body that fits beside the response
        keep = min(max(room, max_seq_len // 4), max_seq_len - head - len(stop_ids))
        prompt_ids = cut_prompt(prompt_ids, tokenizer, head + max(keep, 0))
        response_ids = response_ids[: max(0, max_seq_len - len(prompt_ids) - len(stop_ids))]

    input_ids = prompt_ids + response_ids + stop_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids + stop_ids,
        "prompt_len": len(prompt_ids),
        "truncated": truncated,
    }


def _example_prompt(example: dict, tokenizer, template: str) -> str:
    missing = [k for k in ("instruction", "response") if not isinstance(example.get(k), str)]
    if missing:
        where = f" (id {example['id']!r})" if "id" in example else ""
        raise ValueError(f"example{where} lacks string field(s) {', '.join(missing)}; keys: {sorted(example)}")
    return build_prompt(example["instruction"], example.get("input") or "", template=template, tokenizer=tokenizer)


def encode_example(example: dict, tokenizer, *, template: str = "study", max_seq_len: int = 128) -> dict:
    """Encode one unified row (``instruction``, optional ``input``, ``response``) for training or scoring."""
    prompt = _example_prompt(example, tokenizer, template)
    return encode_pair(prompt, example["response"], tokenizer, template=template, max_seq_len=max_seq_len)


def encode_examples(examples: Sequence[dict], tokenizer, *, template: str = "study", max_seq_len: int = 128) -> list[dict]:
    """``encode_example`` of every row, with the prompts and the responses each tokenized in one batched
    call: a fast tokenizer encodes a batch in parallel, where one call a text costs a Python round trip
    per row (most of a trial's data preparation)."""
    prompts = [_example_prompt(example, tokenizer, template) for example in examples]
    if not prompts:
        return []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([example["response"] for example in examples], add_special_tokens=False)["input_ids"]
    return [_assemble(_with_prefix(list(p), tokenizer), list(r), tokenizer, template, max_seq_len)
            for p, r in zip(prompt_ids, response_ids)]  # fmt: skip


def pad_batch(features: Sequence[dict], pad_id: int | None, *, side: str = "right", width: int = 0) -> dict:
    """Pad encoded features to one length (the longest, or ``width`` when given: one fixed shape for
    torch.compile); returns ``input_ids``, ``attention_mask`` (and ``labels``) tensors.

    Labels are -100 wherever the attention mask is 0. Padding is found by the mask, never by
    comparing ids with ``pad_id``: with pad = EOS (SmolLM2 upstream) that would unlearn the stop token.
    """
    import torch

    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if pad_id is None:
        raise ValueError("pad_id is None: give the tokenizer a pad token first (duetto.tokens.ensure_pad_token)")
    if not features:
        raise ValueError("pad_batch needs at least one feature")
    longest = max(len(f["input_ids"]) for f in features)
    if width and longest > width:
        raise ValueError(f"a feature of {longest} tokens does not fit the fixed width {width}")
    width = width or longest
    with_labels = all("labels" in f for f in features)
    ids, masks, labels = [], [], []
    for f in features:
        n = len(f["input_ids"])
        mask = list(f.get("attention_mask") or [1] * n)
        row_labels = list(f["labels"]) if with_labels else None
        if len(mask) != n or (row_labels is not None and len(row_labels) != n):
            raise ValueError(f"feature lengths differ: input_ids {n}, attention_mask {len(mask)}, labels {len(row_labels or [])}")
        fill = width - n

        def pad(row: list[int], value: int) -> list[int]:
            return row + [value] * fill if side == "right" else [value] * fill + row

        ids.append(pad(list(f["input_ids"]), pad_id))
        masks.append(pad(mask, 0))
        if row_labels is not None:
            labels.append(pad(row_labels, IGNORE_INDEX))
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(masks, dtype=torch.long)}
    if with_labels:
        label_tensor = torch.tensor(labels, dtype=torch.long)
        label_tensor[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = label_tensor
    return batch


def count_truncated(features: Iterable[dict]) -> int:
    """How many encoded features had their prompt or response cut."""
    return sum(bool(f.get("truncated")) for f in features)
