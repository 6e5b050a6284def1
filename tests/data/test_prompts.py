"""duetto.data.prompts: templates, exact label masks, BOS handling, padding by mask, truncation."""

from __future__ import annotations

import pytest

from duetto.data.prompts import (
    IGNORE_INDEX,
    build_prompt,
    count_truncated,
    encode_example,
    encode_examples,
    encode_pair,
    encode_prompt,
    pad_batch,
    response_end,
)

RESPONSE = "The capital of France is Paris."


@pytest.fixture(scope="module")
def gemma_tok(tiny_gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gemma_dir)


@pytest.fixture(scope="module")
def smollm_tok(tiny_smollm_dir):
    from duetto.models import load_tokenizer

    return load_tokenizer(str(tiny_smollm_dir))  # SmolLM2 has no pad: load_tokenizer gives it one


@pytest.fixture(params=["gemma", "smollm"])
def tok(request, gemma_tok, smollm_tok):
    return gemma_tok if request.param == "gemma" else smollm_tok


# --- prompt text ---------------------------------------------------------------------------------


def test_study_template_leaves_out_an_empty_input():
    assert build_prompt("Name a fruit.") == "Instruction:\nName a fruit.\n\nResponse:\n"
    assert build_prompt("Name a fruit.", "  \n") == "Instruction:\nName a fruit.\n\nResponse:\n"
    assert build_prompt("Translate.", "Good morning") == "Instruction:\nTranslate.\n\nInput:\nGood morning\n\nResponse:\n"


def test_chat_template_uses_the_models_own_template(gemma_tok, smollm_tok):
    assert build_prompt("Translate.", "Good morning", template="chat", tokenizer=gemma_tok) == (
        "<bos><start_of_turn>user\nTranslate.\n\nGood morning<end_of_turn>\n<start_of_turn>model\n"
    )
    assert build_prompt("Name a fruit.", template="chat", tokenizer=smollm_tok).endswith(
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_needs_a_tokenizer_with_one(gemma_tok):
    with pytest.raises(ValueError, match="chat"):
        build_prompt("Hi", template="chat")
    with pytest.raises(ValueError, match="template must be one of"):
        build_prompt("Hi", template="alpaca")


def test_response_end_is_eos_for_study_and_end_of_turn_for_chat(gemma_tok, smollm_tok):
    assert response_end(gemma_tok, "study") == "<eos>"
    assert response_end(gemma_tok, "chat") == "<end_of_turn>"
    assert response_end(smollm_tok, "study") == "<|im_end|>"
    assert response_end(smollm_tok, "chat") == "<|im_end|>"


def test_response_end_falls_back_to_eos_without_a_turn_token(tiny_gemma_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gemma_dir)
    assert response_end(tok, "chat") == "<end_of_turn>"
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert response_end(tok, "chat") == "<eos>"  # the answer follows the template, not a stale memo


# --- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["study", "chat"])
def test_labels_mask_exactly_the_prompt(tok, template):
    prompt = build_prompt("What is the capital of France?", template=template, tokenizer=tok)
    enc = encode_pair(prompt, RESPONSE, tok, template=template, max_seq_len=512)
    prompt_ids = encode_prompt(prompt, tok)
    response_ids = tok(RESPONSE, add_special_tokens=False).input_ids
    stop_id = tok.convert_tokens_to_ids(response_end(tok, template))

    assert enc["input_ids"] == prompt_ids + response_ids + [stop_id]
    assert enc["prompt_len"] == len(prompt_ids) and not enc["truncated"]
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    n = enc["prompt_len"]
    assert enc["labels"][:n] == [IGNORE_INDEX] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    learned = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned) == RESPONSE + response_end(tok, template)


def test_bos_is_added_once(gemma_tok, smollm_tok):
    bos = gemma_tok.bos_token_id
    for template in ("study", "chat"):  # study: the tokenizer's BOS; chat: the template's, not doubled
        prompt = build_prompt("Hi", template=template, tokenizer=gemma_tok)
        ids = encode_pair(prompt, "Hello.", gemma_tok, template=template)["input_ids"]
        assert ids[0] == bos and ids.count(bos) == 1, template
    # SmolLM2 adds no BOS: the study prompt starts with its first word
    ids = encode_pair(build_prompt("Hi"), "Hello.", smollm_tok)["input_ids"]
    assert smollm_tok.convert_ids_to_tokens(ids[0]) == "Instruction"
    # its chat template starts with <|im_start|>, which is also its bos_token: still not doubled
    enc = encode_pair(build_prompt("Hi", template="chat", tokenizer=smollm_tok), "Hello.", smollm_tok, template="chat")
    assert smollm_tok.decode(enc["input_ids"]).startswith("<|im_start|>system\n")


def test_empty_input_leaves_out_the_input_block(tok):
    enc = encode_example({"instruction": "Name a fruit.", "input": "", "response": "Apple."}, tok)
    text = tok.decode(enc["input_ids"][: enc["prompt_len"]], skip_special_tokens=True)
    assert text == "Instruction:\nName a fruit.\n\nResponse:\n"
    enc = encode_example({"instruction": "Name a fruit.", "input": "red", "response": "Apple."}, tok)
    assert "Input:\nred" in tok.decode(enc["input_ids"][: enc["prompt_len"]])


def test_encode_example_names_missing_fields(tok):
    with pytest.raises(ValueError, match="response"):
        encode_example({"instruction": "Hi", "id": "alpaca-7"}, tok)
    with pytest.raises(ValueError, match="alpaca-7"):
        encode_example({"response": "Hi", "id": "alpaca-7"}, tok)


# --- padding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_masked_by_the_attention_mask_even_when_pad_is_eos(smollm_tok, side):
    tok = smollm_tok
    eos = tok.eos_token_id
    short = encode_pair(build_prompt("Hi"), "Hello.", tok)
    long = encode_pair(build_prompt("What is the capital of France?"), RESPONSE, tok)
    assert short["labels"][-1] == eos  # the stop token is learned
    batch = pad_batch([short, long], pad_id=eos, side=side)  # SmolLM2 upstream: pad == eos

    width = len(long["input_ids"])
    fill = width - len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    row = batch["labels"][0].tolist()
    mask = batch["attention_mask"][0].tolist()
    if side == "right":
        assert mask == [1] * len(short["input_ids"]) + [0] * fill
        assert row == short["labels"] + [IGNORE_INDEX] * fill
        assert row[len(short["input_ids"]) - 1] == eos  # still learned, although it equals the pad id
    else:
        assert mask == [0] * fill + [1] * len(short["input_ids"])
        assert row == [IGNORE_INDEX] * fill + short["labels"]
        assert batch["input_ids"][0, :fill].tolist() == [eos] * fill
    assert batch["labels"][1].tolist() == long["labels"]
    learned = (batch["labels"] != IGNORE_INDEX).sum().item()
    assert learned == sum(sum(t != IGNORE_INDEX for t in f["labels"]) for f in (short, long))


def test_pad_batch_without_labels_and_bad_input(gemma_tok):
    feats = [{"input_ids": encode_prompt(build_prompt(q), gemma_tok)} for q in ("Hi", "Name three colors.")]
    batch = pad_batch(feats, gemma_tok.pad_token_id, side="left")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"][0, 0].item() == gemma_tok.pad_token_id
    with pytest.raises(ValueError, match="ensure_pad_token"):
        pad_batch(feats, None)
    with pytest.raises(ValueError, match="side"):
        pad_batch(feats, 0, side="middle")


# --- truncation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["study", "chat"])
def test_truncation_cuts_the_prompt_from_the_left_and_is_counted(tok, template):
    long_input = " ".join(["The children played in the garden while their parents cooked dinner."] * 20)
    example = {"instruction": "Summarize the following text.", "input": long_input, "response": RESPONSE}
    full = encode_example(example, tok, template=template, max_seq_len=4096)
    cut = encode_example(example, tok, template=template, max_seq_len=64)
    short = encode_example({"instruction": "Hi", "input": "", "response": "Hello."}, tok, template=template,
                           max_seq_len=64)
    assert not full["truncated"] and cut["truncated"] and not short["truncated"]
    assert count_truncated([full, cut, short]) == 1
    assert len(cut["input_ids"]) == 64
    # the response and its stop token are untouched; the prompt keeps its end (the response cue)
    n_resp = len(full["input_ids"]) - full["prompt_len"]
    assert cut["input_ids"][-n_resp:] == full["input_ids"][-n_resp:]
    assert cut["labels"][-n_resp:] == full["labels"][-n_resp:]
    assert cut["labels"][: cut["prompt_len"]] == [IGNORE_INDEX] * cut["prompt_len"]
    kept_tail = cut["prompt_len"] - (1 if tok.bos_token_id == cut["input_ids"][0] else 0)
    assert cut["input_ids"][cut["prompt_len"] - kept_tail : cut["prompt_len"]] == \
        full["input_ids"][full["prompt_len"] - kept_tail : full["prompt_len"]]
    if tok.bos_token == "<bos>":  # Gemma: BOS survives the cut
        assert cut["input_ids"][0] == tok.bos_token_id and cut["input_ids"].count(tok.bos_token_id) == 1


@pytest.mark.parametrize("template", ["study", "chat"])
def test_batched_encoding_equals_one_row_at_a_time(tok, template):
    """encode_examples (one tokenizer call for all prompts, one for all responses) gives what encode_example
    gives row by row: BOS once, truncation, empty inputs and responses, a response over max_seq_len."""
    long_input = " ".join(["The children played in the garden while their parents cooked dinner."] * 20)
    rows = [
        {"instruction": "Summarize the following text.", "input": long_input, "response": RESPONSE},
        {"instruction": "Hi", "input": "", "response": "Hello."},
        {"instruction": "Say nothing.", "response": ""},
        {"instruction": "Name a city.", "input": "Europe", "response": " ".join(["Paris is lovely."] * 40)},
        {"instruction": "<bos>Starts with a special-looking text", "input": "x", "response": "y"},
    ]
    for max_seq_len in (64, 4096):
        one_by_one = [encode_example(r, tok, template=template, max_seq_len=max_seq_len) for r in rows]
        assert encode_examples(rows, tok, template=template, max_seq_len=max_seq_len) == one_by_one
    assert encode_examples([], tok, template=template) == []
    with pytest.raises(ValueError, match="lacks string field"):
        encode_examples([rows[0], {"instruction": "no response"}], tok, template=template)


@pytest.mark.parametrize("template", ["study", "chat"])
def test_an_inference_prompt_is_cut_by_the_training_rule(tok, template):
    """encode_prompt(max_tokens=n): BOS + the prompt's last ids, the cut a training example's prompt gets."""
    long_input = " ".join(["The children played in the garden while their parents cooked dinner."] * 10)
    prompt = build_prompt("Summarize the following text.", long_input, template=template, tokenizer=tok)
    full = encode_prompt(prompt, tok)
    head = 1 if full[0] == tok.bos_token_id and tok.bos_token == "<bos>" else 0  # SmolLM2 adds no BOS
    cut = encode_prompt(prompt, tok, max_tokens=40)
    assert len(cut) == 40 and cut[:head] == full[:head] and cut[head:] == full[len(full) - 40 + head :]
    if head:  # Gemma: the BOS survives, once
        assert cut[0] == tok.bos_token_id and cut.count(tok.bos_token_id) == 1
    assert encode_prompt(prompt, tok, max_tokens=len(full)) == full
    enc = encode_pair(prompt, RESPONSE, tok, template=template, max_seq_len=48)
    assert enc["truncated"]
    assert enc["input_ids"][: enc["prompt_len"]] == encode_prompt(prompt, tok, max_tokens=enc["prompt_len"])


def test_an_overlong_response_loses_its_tail_but_keeps_the_stop_token(gemma_tok):
    tok = gemma_tok
    response = " ".join(["Plants need sunlight, water and air to grow."] * 20)
    prompt = build_prompt("Tell me about plants.")
    enc = encode_pair(prompt, response, tok, max_seq_len=48)
    assert enc["truncated"] and len(enc["input_ids"]) == 48
    assert enc["labels"][-1] == tok.eos_token_id
    assert enc["prompt_len"] >= 48 // 4  # the prompt keeps its cue
    assert tok.decode(enc["input_ids"][: enc["prompt_len"]]).endswith("Response:\n")
    learned = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned[:-1]) == tok.decode(tok(response, add_special_tokens=False).input_ids[: len(learned) - 1])


def test_max_seq_len_must_leave_room(gemma_tok):
    with pytest.raises(ValueError, match="max_seq_len"):
        encode_pair(build_prompt("Hi"), "Hello.", gemma_tok, max_seq_len=2)
    tight = encode_pair(build_prompt("Hi"), "Hello.", gemma_tok, max_seq_len=3)
    assert len(tight["input_ids"]) == 3 and tight["labels"][-1] == gemma_tok.eos_token_id


def test_pad_batch_to_a_fixed_width(gemma_tok):
    feats = [{"input_ids": encode_prompt(build_prompt(q), gemma_tok)} for q in ("Hi", "Name three colors.")]
    longest = max(len(f["input_ids"]) for f in feats)
    batch = pad_batch(feats, gemma_tok.pad_token_id, width=longest + 7)
    assert batch["input_ids"].shape == (2, longest + 7)
    assert batch["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in feats)
    with pytest.raises(ValueError, match="fixed width"):
        pad_batch(feats, gemma_tok.pad_token_id, width=longest - 1)
