"""Tiny random test models: ``duetto model tiny DIR``.

Two layers and a BPE tokenizer trained offline on a built-in corpus, in the shape of Gemma 3
(``gemma``) or SmolLM2 (``smollm``): the same special tokens, chat template and BOS/pad/EOS
conventions as the real models. Tests and the CPU demo run on these. Only the standard library is
imported at module level; tokenizers, torch and transformers load inside the builders.
"""

from __future__ import annotations

from pathlib import Path

from duetto.model_cache import build_once, models_dir, read_manifest, write_manifest
from duetto.tokens import GEMMA_CHAT_TEMPLATE, SMOLLM_CHAT_TEMPLATE, stop_token_ids

#: Bump when the tiny builder changes, so cached tiny models are rebuilt instead of reused.
TINY_VERSION = 1

TINY_STYLES = ("gemma", "smollm")

# A small English corpus for the tiny BPE: instruction-style sentences so that the words the tests
# and the demo use become one or two tokens each. Built from fixed lists, hence deterministic.
_CORPUS_SENTENCES = """\
Instruction: Input: Response: Question: Answer: Summary: Example: Output:
Give three tips for staying healthy.
Eat a balanced diet, exercise regularly and get enough sleep.
Explain why the sky is blue.
The sky looks blue because air scatters blue light from the sun more than red light.
Write a short poem about the sea.
The sea is wide and deep, the waves are singing me to sleep.
Summarize the following text in one sentence.
Translate the following sentence into French.
Classify the following animal as a mammal, bird or fish.
Rewrite the sentence in the past tense.
Name three colors of the rainbow.
Red, orange and yellow are colors of the rainbow.
Describe the weather today.
It is a warm and sunny day with a light wind.
How do I make a cup of tea?
Boil water, pour it over a tea bag, wait three minutes and add milk if you like.
What is the boiling point of water?
Water boils at one hundred degrees Celsius at sea level.
List the days of the week.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
Who wrote the play Romeo and Juliet?
William Shakespeare wrote Romeo and Juliet.
Give an example of a renewable energy source.
Solar power is a renewable source of energy.
Generate a list of five fruits.
Apple, banana, cherry, grape and orange.
Suggest a name for a new coffee shop.
What does a computer program do?
A computer program is a list of instructions that a computer follows to solve a problem.
Why is exercise important?
Exercise keeps the heart strong, improves mood and helps people live longer.
Please answer the question briefly and clearly.
Thank you for your help. You are welcome, I am happy to help.
I do not know the answer to that question, but I can try to find out.
The quick brown fox jumps over the lazy dog.
Once upon a time there was a small village near a large forest.
The children played in the garden while their parents cooked dinner.
Learning a new language takes time, practice and patience.
A good story has a beginning, a middle and an end.
The train leaves the station at nine o'clock in the morning.
Scientists study the world to understand how nature works.
The market sells fresh bread, cheese, fish and vegetables every week.
Reading books every day can improve your vocabulary and your writing.
The museum is open from Monday to Friday and closed on public holidays.
Plants need sunlight, water and air to grow.
The teacher asked the students to write an essay about their family.
Music brings people together and helps them express their feelings.
"""

_COUNTRIES = [
    ("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("India", "New Delhi"), ("China", "Beijing"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Australia", "Canberra"), ("Russia", "Moscow"), ("Portugal", "Lisbon"),
]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_WORDS = [
    ("happy", "glad", "sad"), ("big", "large", "small"), ("fast", "quick", "slow"), ("hot", "warm", "cold"),
    ("easy", "simple", "hard"), ("begin", "start", "end"), ("smart", "clever", "foolish"),
    ("old", "ancient", "new"), ("rich", "wealthy", "poor"), ("strong", "powerful", "weak"),
    ("bright", "shiny", "dark"), ("quiet", "silent", "loud"), ("good", "fine", "bad"),
]
_ANIMALS = [("dog", "mammal"), ("cat", "mammal"), ("eagle", "bird"), ("salmon", "fish"), ("horse", "mammal"),
            ("parrot", "bird"), ("shark", "fish"), ("whale", "mammal"), ("owl", "bird"), ("tuna", "fish")]


def _qa_pairs() -> list[tuple[str, str]]:
    pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in _COUNTRIES]
    for a in range(1, 11):
        for b in (1, 2, 3, 5):
            words = f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[a + b] if a + b <= 10 else a + b}."
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}. {words}"))
    for word, synonym, antonym in _WORDS:
        pairs.append((f"Give a synonym for the word {word}.", f"A synonym for {word} is {synonym}."))
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {antonym}."))
    for animal, kind in _ANIMALS:
        pairs.append((f"Is a {animal} a mammal, a bird or a fish?", f"A {animal} is a {kind}."))
    return pairs


def tiny_corpus() -> list[str]:
    """A few hundred lines of simple English, the same on every machine and Python version.

    Question/answer pairs also appear in the study's prompt layout and in chat turns, so the
    template words (Instruction, Input, Response, user, model, assistant) become single tokens.
    """
    lines = [s for s in _CORPUS_SENTENCES.splitlines() if s]
    for i, (question, answer) in enumerate(_qa_pairs()):
        context = f"\n\nInput:\n{lines[i % len(lines)]}" if i % 3 == 0 else ""
        lines += [
            question, answer,
            f"Instruction:\n{question}{context}\n\nResponse:\n{answer}",
            f"system\nYou are a helpful assistant.\nuser\n{question}\nmodel\n{answer}\nassistant\n{answer}",
        ]
    return lines


def _train_bpe(specials: list[str], vocab_size: int, corpus: list[str] | None = None):
    """A byte-level BPE trained on ``corpus`` (default: ``tiny_corpus()``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level BPE (as SmolLM2/GPT-2): every string round-trips exactly, so label-span decodes in
    # tests compare text with text, and no input is ever <unk>.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny_corpus() if corpus is None else corpus, trainer=trainer)
    return tok


def _tiny_tokenizer(style: str):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if style == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # Gemma's ids 0-3
        backend = _train_bpe(specials, vocab_size=1024)
        bos_id = backend.token_to_id("<bos>")
        # Gemma's tokenizer puts <bos> in front of every encoded text.
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
        )
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
            additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        )
        tok.chat_template = GEMMA_CHAT_TEMPLATE
    else:
        # SmolLM2: no BOS added, eos = <|im_end|>, and no pad token at all (callers use ensure_pad_token).
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        backend = _train_bpe(specials, vocab_size=1024)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        )
        tok.chat_template = SMOLLM_CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


def build_tiny(out_dir: str | Path, style: str = "gemma", seed: int = 0) -> Path:
    """Write a 2-layer random model + trained tokenizer to ``out_dir`` (loadable by ``from_pretrained``)."""
    if style not in TINY_STYLES:
        raise ValueError(f"tiny model style must be one of {', '.join(TINY_STYLES)}, got {style!r}")
    import torch
    from transformers import GenerationConfig, logging as hf_logging

    out = Path(out_dir)
    tok = _tiny_tokenizer(style)
    vocab = len(tok)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if style == "gemma":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        # One sliding and one global layer so both attention paths of Gemma 3 are exercised;
        # a window shorter than test sequences makes the sliding mask actually matter.
        config = Gemma3TextConfig(
            **common, query_pre_attn_scalar=32, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )
        model = Gemma3ForCausalLM(config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**common, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5})
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id
    )
    out.mkdir(parents=True, exist_ok=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # save_pretrained warns about generation defaults we set on purpose
    try:
        model.save_pretrained(out)
        tok.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
    write_manifest(out, {"name": f"tiny-{style}", "source": "tiny", "style": style, "seed": seed,
                          "tiny_version": TINY_VERSION})
    return out


def cached_tiny(style: str, seed: int = 0) -> Path:
    """The tiny model of ``style`` in the cache, built there once (rebuilt when TINY_VERSION changes)."""
    target = models_dir() / f"tiny-{style}"

    def fresh() -> bool:
        m = read_manifest(target)
        return bool(m) and m.get("tiny_version") == TINY_VERSION and m.get("seed") == seed

    return build_once(target, fresh, lambda work: build_tiny(work, style=style, seed=seed))
