"""Tokenizer conventions of the model families duetto meets (Gemma 3, ChatML/SmolLM2, Llama 3):
chat templates, a pad token when a vocabulary has none, and the ids that end a turn.

Only the standard library is imported here; the tokenizers passed in are Hugging Face ones.
"""

from __future__ import annotations

from typing import Any

# Gemma 3's own chat template, text-only (images dropped): BOS in the template, "model" as the
# assistant role, a system message folded into the first user turn, each turn ended by <end_of_turn>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# SmolLM2-Instruct's template, verbatim (including its default system prompt).
SMOLLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that end a chat turn in the families we meet (Gemma, ChatML/SmolLM2, Llama 3).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")
# Dedicated padding tokens some vocabularies already have, preferred over reusing another token.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _token_id(tokenizer, token: str) -> int | None:
    """Id of ``token`` if it is a single entry of the vocabulary (not mapped to unk)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:  # unknown tokens map to unk
        return None
    return int(tid)


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token when it has none; returns the tokenizer.

    Preference: a dedicated pad token in the vocabulary, then unk, then eos. pad = eos is acceptable
    only because every padding mask in duetto comes from the attention mask (``pad_batch``), never
    from comparing ids with pad_token_id; a collator that masked by id would erase the learned EOS.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    for candidate in _PAD_CANDIDATES:
        if _token_id(tokenizer, candidate) is not None:
            tokenizer.pad_token = candidate
            return tokenizer
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad, unk or eos token to pad with")
    return tokenizer


def stop_token_ids(tokenizer, model_config: Any = None) -> list[int]:
    """EOS plus end-of-turn ids (``<end_of_turn>``, ``<|im_end|>``, ``<|eot_id|>`` when present).

    ``model_config`` (a model config or a GenerationConfig) adds its own ``eos_token_id``(s).
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(tokenizer.eos_token_id)
    if model_config is not None:
        add(getattr(model_config, "eos_token_id", None))
        gen = getattr(model_config, "generation_config", None)
        if gen is not None:
            add(getattr(gen, "eos_token_id", None))
    for token in END_OF_TURN_TOKENS:
        add(_token_id(tokenizer, token))
    return ids

