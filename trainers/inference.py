"""Generation and scoring: the one implementation trial evaluation, the report and Serve all run.

- ``generate_candidates`` samples k candidates per prompt (temperature 0: one greedy answer) in one
  batched ``generate`` call; ``greedy_decode`` is its greedy path in batches, for evaluation.
- ``score_candidates`` is the mean log-likelihood of each response given its prompt; ``StaticScoring``
  gives it static shapes (row and length buckets), compiled once on CUDA and replayed as CUDA graphs.
- ``StaticDecoding`` gives ``generate_candidates`` static shapes (one KV cache per row and length
  bucket, reused by every call), so that on CUDA the decoding step compiles once per bucket and
  replays as a CUDA graph; ``warm_up`` compiles every bucket before the first real call.

A prompt is encoded as training encodes it (``data.prompts.encode_prompt``: BOS once) and cut to
the trained model's ``max_seq_len`` by the rule training uses (BOS + the prompt's tail). A scored
(prompt, response) is encoded exactly like a training example at that length.

Scores are length-normalised so long and short answers compete fairly:
- ``generator_logprob``: mean log-probability per generated token under the model's own
  distribution (before temperature / top-p; after the generation config's own processors, such as
  suppressed ids), stop token included when one was produced.
- ``reranker_score``: mean log-likelihood of the response tokens given the prompt, with the
  prompt/response encoding (and label mask) training used.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# Logits of the response positions are computed in slices of this many positions, so a 262k vocabulary
# (Gemma 3) never materialises a rows x seq x vocab tensor.
_LOGIT_POSITIONS_PER_SLICE = 2048

# generate's keyword for a cache the caller owns: `cache` since transformers renamed it (its outputs then
# name the field `cache` too), `past_key_values` before.
def _cache_kwarg() -> str:
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


# torch.manual_seed is process-global; hold this while seeding + sampling so concurrent callers in
# one process (threads of a replica) cannot interleave draws.
_SAMPLING_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    """A model ready for inference with what it takes to prompt it the way it was trained."""

    model: Any
    tokenizer: Any
    template: str
    stop_ids: list[int]
    max_seq_len: int
    """Length that cuts a prompt and encodes a scored pair: the trial's training max_seq_len when
    known (never above the context), else the context window."""
    context: int
    """The context window (capped by Serve's limits.max_context_tokens): prompt + answer must fit."""
    name: str = ""
    static: StaticDecoding | None = None
    """Static-shape decoding for ``generate_candidates`` (None: the default dynamic cache)."""
    static_scoring: StaticScoring | None = None
    """Static-shape scoring for ``score_candidates`` (None: eager forwards)."""


def _bucket(n: int, sizes: Sequence[int]) -> int | None:
    return next((b for b in sorted(sizes) if b >= n), None)


class _Buckets:
    """The row and length buckets of a static-shape path."""

    def __init__(self, rows: Sequence[int], lengths: Sequence[int]):
        if not rows or not lengths or min(rows) < 1 or min(lengths) < 2:
            raise ValueError(f"{type(self).__name__} needs row buckets >= 1 and length buckets >= 2, got {rows} / {lengths}")
        self.rows = tuple(sorted(set(int(r) for r in rows)))
        self.lengths = tuple(sorted(set(int(n) for n in lengths)))

    @staticmethod
    def warm_order(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """``pairs`` (rows, length), the first and the last first: the second shape torch.compile sees
        makes the dimensions that changed dynamic (automatic dynamic shapes), so changing rows and
        length together there leaves one more compile instead of two."""
        first, last = pairs[0], pairs[-1]
        return sorted(pairs, key=lambda p: (p != first, p != last))


class StaticDecoding(_Buckets):
    """Static KV caches for ``generate_candidates``: a call's rows are padded up to a row bucket (copies
    of its last row, whose outputs are dropped) and decode into a preallocated ``StaticCache`` whose
    length is the smallest length bucket that holds prompt + new tokens. A call with more rows than the
    largest bucket runs in chunks of it.

    Each (rows, length) pair is one shape for the model's decoding step, so on CUDA transformers'
    auto-compile (``torch.compile``, CUDA graphs) compiles it once and replays it at every later call;
    the caches stay allocated, so the graphs' buffers never move. A call whose prompt + new tokens
    exceed the longest bucket decodes with the dynamic cache instead. On CPU nothing compiles: the
    static path then computes what the dynamic one does (a test checks it).
    """

    def __init__(self, rows: Sequence[int], lengths: Sequence[int], whole_steps: bool = False):
        super().__init__(rows, lengths)
        self._caches: dict[tuple[int, int], Any] = {}
        self.whole_steps = whole_steps
        """Decode with trainers/decode_steps.py (each step one compiled graph: forward, sampling and
        stop bookkeeping) instead of ``generate`` (which compiles the forward alone), for models whose
        generation config adds no processor of its own."""
        self._steps: dict[tuple[int, int], Any] = {}

    def length_for(self, needed: int) -> int | None:
        """The cache length bucket for prompt + new tokens (None: longer than every bucket)."""
        return _bucket(needed, self.lengths)

    def chunks(self, n: int) -> list[tuple[int, int, int]]:
        """(start, stop, padded rows) of each generate call for ``n`` rows."""
        top = self.rows[-1]
        out = []
        for s in range(0, n, top):
            m = min(top, n - s)
            out.append((s, s + m, _bucket(m, self.rows) or top))
        return out

    def cache(self, model: Any, rows: int, length: int) -> Any:
        """The emptied cache of that bucket (created at its first use)."""
        from transformers import StaticCache

        key = (rows, length)
        cache = self._caches.get(key)
        if cache is None:
            if not self._caches:
                self.allow_recompiles()
            cache = self._caches[key] = StaticCache(config=model.config, max_cache_len=length)
        else:
            cache.reset()
        return cache

    def steps(self, model: Any, rows: int, length: int) -> Any:
        """The bucket's whole decoding step (DecodeSteps) over its emptied cache; compiled on CUDA."""
        from duetto.trainers.decode_steps import DecodeSteps

        cache = self.cache(model, rows, length)
        key = (rows, length)
        if key not in self._steps:
            self._steps[key] = DecodeSteps(model, cache, length, compile=next(model.parameters()).device.type == "cuda")
        return self._steps[key]

    def allow_recompiles(self) -> None:
        """torch.compile keeps 8 shapes of a function by default and runs eager past that: allow one
        per bucket (and a few for the model's other compiled callers)."""
        import torch._dynamo

        needed = len(self.rows) * len(self.lengths) + 8
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name) and getattr(cfg, name) < needed:
                setattr(cfg, name, needed)

    def warm_up(self, model: Any, tokenizer: Any, stop_ids: Sequence[int] | None = None) -> dict[str, float]:
        """Run one short sampled generate call in every bucket, so compilation and CUDA-graph capture
        happen here and never in a request; returns the seconds each bucket took."""
        import time

        times = {}
        prompt = tokenizer.decode(tokenizer("Hello")["input_ids"], skip_special_tokens=True) or "Hello"
        for rows, length in self.warm_order([(r, n) for n in self.lengths for r in self.rows]):
            t = time.perf_counter()
            # two calls: the first compiles, the second records the CUDA graph
            new = min(4, length - 1)
            for _ in range(2):  # every step decodes (min_new_tokens): a sampled stop token would end it early
                generate_candidates(model, tokenizer, [prompt], rows, max_new_tokens=new, min_new_tokens=new,
                                    temperature=1.0, stop_ids=stop_ids, max_prompt_tokens=1, static=self,
                                    _length=length)  # fmt: skip
            times[f"{rows}x{length}"] = round(time.perf_counter() - t, 2)
        return times


class StaticScoring(_Buckets):
    """Static shapes for ``score_candidates``: a forward's rows are padded up to a row bucket (copies of
    its last row, whose scores are dropped) and its tokens, right-padded, up to a length bucket, so on
    CUDA the decoder compiles once (``torch.compile``, CUDA graphs) and each bucket replays its graph.
    An eager forward of a small model is bound by launching its kernels (tens of ms for 30 layers,
    whatever the batch); the replay launches one graph. Right padding never changes a real token's
    hidden state (causal attention), so the scores are those of the eager path (a test checks it).
    A batch longer than the longest bucket runs eagerly; on CPU nothing compiles.
    """

    def __init__(self, rows: Sequence[int], lengths: Sequence[int]):
        super().__init__(rows, lengths)
        self._forward: Any = None
        self._decoder: Any = None

    def shape_for(self, rows: int, length: int) -> tuple[int, int] | None:
        """(padded rows, padded length) of a forward (None: longer than every bucket: eager)."""
        padded = _bucket(length, self.lengths)
        return None if padded is None else (_bucket(rows, self.rows) or self.rows[-1], padded)

    def hidden(self, decoder: Any, input_ids: Any, attention_mask: Any) -> Any:
        """The decoder's last hidden states, through the compiled forward on CUDA. The result may be a
        CUDA graph's output buffer: read it before the next call."""
        import torch

        if self._decoder is not decoder:
            cuda = input_ids.device.type == "cuda"
            self._forward = torch.compile(decoder, mode="reduce-overhead") if cuda else decoder
            self._decoder = decoder
        return self._forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def warm_up(self, model: Any, max_seq_len: int) -> dict[str, float]:
        """Run every bucket a scored pair of at most ``max_seq_len`` tokens can take, twice (compile,
        then record the CUDA graph), so no request pays for it; returns the seconds each took."""
        import time

        import torch

        decoder = model.get_decoder()
        device = next(model.parameters()).device
        top = _bucket(max_seq_len, self.lengths) or self.lengths[-1]
        times = {}
        with _eval_mode(model), torch.no_grad():
            for rows, length in self.warm_order([(r, n) for n in self.lengths if n <= top for r in self.rows]):
                t = time.perf_counter()
                ids = torch.ones((rows, length), dtype=torch.long, device=device)
                for _ in range(2):
                    self.hidden(decoder, ids, torch.ones_like(ids)).sum().item()
                times[f"score {rows}x{length}"] = round(time.perf_counter() - t, 2)
        return times


@dataclass
class Candidate:
    text: str
    generator_logprob: float | None = None
    reranker_score: float | None = None
    prior_score: float | None = None
    """The reranker's mean log-prob of the text after an empty instruction (mode pmi)."""
    consensus: float | None = None
    """Mean ROUGE-L F against the request's other candidates (mode consensus)."""
    tokens: int = 0
    """Generated tokens, the stop token included when one was produced."""
    finish_reason: str = "stop"
    """stop = the model ended the answer; length = cut at max_new_tokens."""
    token_ids: list[int] = field(default_factory=list)
    """The generated ids (stop token included) the log-prob was computed over."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_text(tokenizer: Any, template: str, instruction: str, input: str = "") -> str:
    from duetto.data.prompts import build_prompt

    return build_prompt(instruction, input or "", template=template, tokenizer=tokenizer)


def count_prompt_tokens(tokenizer: Any, template: str, instruction: str, input: str = "") -> int:
    """Prompt length in the ids the model receives before any cut (BOS included, as training encodes it)."""
    from duetto.data.prompts import encode_prompt

    return len(encode_prompt(prompt_text(tokenizer, template, instruction, input), tokenizer))


def stop_suffix_tokens(tokenizer: Any, template: str) -> int:
    """Tokens scoring appends after a response (EOS or the chat end-of-turn)."""
    from duetto.data.prompts import response_end

    return len(tokenizer(response_end(tokenizer, template), add_special_tokens=False)["input_ids"])


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while decoding or scoring; a model called mid-training goes back to train mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _chosen_logprobs():
    """A logits processor that records each chosen token's log-probability under the model's
    distribution: after the generation config's own processors (e.g. suppressed ids), before
    temperature and top-p, which transformers applies after any processor passed in. Step t's token is
    known at step t+1's call (the last id of ``input_ids``), so it keeps one rows x vocab tensor, never
    one per new token (64 tokens x 128 rows x Gemma 3's 262k ids would be 8.6 GB)."""
    import torch
    from transformers import LogitsProcessor

    class ChosenLogprobs(LogitsProcessor):
        def __init__(self) -> None:
            self.previous: torch.Tensor | None = None
            self.steps: list[torch.Tensor] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.previous is not None:
                self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.previous = torch.log_softmax(scores.float(), dim=-1)
            return scores

        def finish(self, sequences: torch.Tensor) -> torch.Tensor:
            """(rows, new tokens) log-probabilities, once generate has returned ``sequences``."""
            if self.previous is not None:
                self.steps.append(self.previous.gather(-1, sequences[:, -1:]).squeeze(-1))
                self.previous = None
            return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.shape[0], 0)).float()

    return ChosenLogprobs()


def _greedy_rows(rows: Any):
    """A logits processor that leaves only the most likely token to the rows marked in ``rows`` (a
    bool tensor): sampling then picks it, so those rows decode greedily beside sampled ones. It runs
    after the recorder of chosen log-probabilities and before temperature and top-p, which keep the
    most likely token."""
    import torch
    from transformers import LogitsProcessor

    class GreedyRows(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            best = scores.argmax(dim=-1, keepdim=True)
            only_best = torch.full_like(scores, float("-inf")).scatter_(-1, best, 0.0)
            return torch.where(rows.unsqueeze(-1), only_best, scores)

    return GreedyRows()


def generate_candidates(model: Any, tokenizer: Any, prompts: Sequence[str], k: int | Sequence[int], *,
                        max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                        seed: int | None = None, stop_ids: Sequence[int] | None = None,
                        max_prompt_tokens: int | None = None, static: StaticDecoding | None = None,
                        logprobs: bool = True, min_new_tokens: int = 0, greedy_first: bool = False,
                        _length: int | None = None) -> list[list[Candidate]]:  # fmt: skip
    """Sample ``k`` candidates per templated prompt in one batched ``generate`` call.

    ``k`` may differ per prompt (each prompt's row is repeated k times, which is what
    ``num_return_sequences`` does, so requests with different k share one call). temperature 0 means
    greedy decoding: one candidate per prompt whatever k says (k greedy copies would be identical).
    ``max_prompt_tokens`` cuts each prompt by the training rule (BOS + its tail). ``static`` decodes
    on static shapes (see StaticDecoding; ``_length`` forces its length bucket, for warm-up).
    ``logprobs=False`` skips ``generator_logprob`` (None; evaluation needs only the text).
    ``greedy_first``: each prompt's first candidate is its greedy answer (the most likely token at
    every step), decoded in the same call as the sampled ones.
    """
    import torch

    from duetto.data.prompts import encode_prompt, pad_batch
    from duetto.tokens import ensure_pad_token, stop_token_ids
    from duetto.trainers.decode_steps import decode, plain_sampling

    ensure_pad_token(tokenizer)
    ks = [int(k)] * len(prompts) if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != len(prompts):
        raise ValueError(f"k: {len(ks)} counts for {len(prompts)} prompts")
    greedy = temperature == 0
    if greedy:
        ks = [1] * len(ks)
    stop = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, getattr(model, "config", None))
    stop_set = set(stop)
    rows = [p for p, n in zip(prompts, ks) for _ in range(n)]
    firsts = [j == 0 and greedy_first and not greedy for n in ks for j in range(n)]
    if not rows:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    # left-padded so every row continues from its right edge
    encoded = {p: encode_prompt(p, tokenizer, max_prompt_tokens) for p in set(rows)}
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=stop, use_cache=True,
                                      pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)  # fmt: skip
    if min_new_tokens:
        gen_kwargs["min_new_tokens"] = min_new_tokens
    if greedy:  # None: a model's own sampling defaults would otherwise warn under greedy decoding
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    widest = max(len(encoded[p]) for p in rows)
    length = _length or (static.length_for(widest + max_new_tokens) if static else None)
    calls = static.chunks(len(rows)) if length else [(0, len(rows), len(rows))]
    id_rows: list[list[int]] = []
    logps = []
    with _SAMPLING_LOCK, _eval_mode(model), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        for start, stop_row, padded in calls:
            part = rows[start:stop_row]
            part = part + [part[-1]] * (padded - len(part))  # bucket padding: copies, dropped below
            enc = pad_batch([{"input_ids": encoded[p]} for p in part], tokenizer.pad_token_id, side="left")
            enc = {key: v.to(device) for key, v in enc.items()}
            greedy_rows = firsts[start:stop_row] + [False] * (padded - (stop_row - start))
            if length and static.whole_steps and plain_sampling(model):
                gen_ids, lp = decode(static.steps(model, padded, length), enc["input_ids"], enc["attention_mask"],
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     greedy_rows=greedy_rows, stop_ids=stop, pad_id=tokenizer.pad_token_id,
                                     min_new_tokens=min_new_tokens)  # fmt: skip
                lp = lp if logprobs else None
            else:
                extra = {_cache_kwarg(): static.cache(model, padded, length)} if length else {}
                recorder = _chosen_logprobs() if logprobs else None
                processors = [recorder] if recorder is not None else []
                if any(greedy_rows):
                    processors.append(_greedy_rows(torch.tensor(greedy_rows, device=device)))
                if processors:
                    extra["logits_processor"] = processors
                out = model.generate(**enc, **gen_kwargs, **extra)
                gen_ids = out.sequences[:, enc["input_ids"].shape[1] :]
                lp = recorder.finish(out.sequences) if recorder is not None else None
                del out
            gen_ids = gen_ids[: stop_row - start]  # the bucket's padding rows dropped
            logps.append(torch.full(gen_ids.shape, float("nan")) if lp is None else lp[: stop_row - start].cpu())
            id_rows.extend(gen_ids.cpu().tolist())
    logp = [row for part in logps for row in part]
    flat: list[Candidate] = []
    for ids, lp in zip(id_rows, logp):
        end = next((i for i, t in enumerate(ids) if t in stop_set), None)
        n = len(ids) if end is None else end + 1
        text_ids = ids if end is None else ids[:end]
        mean_lp = float(lp[:n].sum() / max(n, 1)) if logprobs else None
        text = tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        flat.append(Candidate(text, mean_lp, tokens=n, finish_reason="length" if end is None else "stop",
                              token_ids=[int(t) for t in ids[:n]]))  # fmt: skip
    rest = iter(flat)
    return [list(itertools.islice(rest, n)) for n in ks]


def greedy_decode(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                  max_prompt_tokens: int | None, batch_size: int = 16, stop_ids: Sequence[int] | None = None,
                  logprobs: bool = True) -> list[Candidate]:  # fmt: skip
    """One greedy answer per templated prompt, ``batch_size`` prompts per ``generate`` call."""
    out: list[Candidate] = []
    for s in range(0, len(prompts), batch_size):
        cands = generate_candidates(
            model, tokenizer, prompts[s : s + batch_size], 1, max_new_tokens=max_new_tokens, temperature=0.0,
            stop_ids=stop_ids, max_prompt_tokens=max_prompt_tokens, logprobs=logprobs,
        )  # fmt: skip
        out.extend(cs[0] for cs in cands)
    return out


def _response_logits(model: Any, input_ids: Any, attention_mask: Any, positions: Any,
                     static: StaticScoring | None = None) -> Any:  # fmt: skip
    """Logits at ``positions`` (a boolean rows x seq mask) without a full rows x seq x vocab tensor;
    ``static``: the decoder runs through it (padded shapes, compiled on CUDA)."""
    import torch

    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        decoder = head = None
    if decoder is None or head is None:  # unusual architecture: the plain forward is always right
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions].float()
    if static is None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    else:
        hidden = static.hidden(decoder, input_ids, attention_mask)
    hidden = hidden[positions]
    cap = getattr(getattr(model.config, "text_config", None) or model.config, "final_logit_softcapping", None)
    parts = []
    for s in range(0, hidden.shape[0], _LOGIT_POSITIONS_PER_SLICE):
        logits = head(hidden[s : s + _LOGIT_POSITIONS_PER_SLICE]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        parts.append(logits)
    return torch.cat(parts) if parts else hidden.new_zeros((0, head.weight.shape[0])).float()


def score_candidates(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str, str]], *, template: str,
                     max_seq_len: int, batch_rows: int = 32, static: StaticScoring | None = None) -> list[float]:  # fmt: skip
    """Mean log-likelihood per response token of each (instruction, input, response) under ``model``,
    each encoded like a training example of ``max_seq_len``, ``batch_rows`` rows per forward (at most
    ``static``'s largest row bucket when it is given: see StaticScoring)."""
    import torch

    from duetto.data.prompts import encode_examples, pad_batch
    from duetto.tokens import ensure_pad_token

    ensure_pad_token(tokenizer)
    device = next(model.parameters()).device
    rows = [{"instruction": instruction, "input": inp or "", "response": resp} for instruction, inp, resp in pairs]
    feats = encode_examples(rows, tokenizer, template=template, max_seq_len=max_seq_len)
    if static is not None:
        batch_rows = min(batch_rows, static.rows[-1])
    scores: list[float] = []
    # no_grad rather than inference_mode: CUDA graphs of the static path record under it
    with _eval_mode(model), torch.no_grad():
        for s in range(0, len(feats), batch_rows):
            chunk = feats[s : s + batch_rows]
            n = len(chunk)
            shape = static.shape_for(n, max(len(f["input_ids"]) for f in chunk)) if static is not None else None
            if shape is not None:  # a bucket's shape: copies of the last row, pad tokens up to its length
                chunk = chunk + [chunk[-1]] * (shape[0] - n)
            batch = pad_batch(chunk, tokenizer.pad_token_id, side="right", width=shape[1] if shape else 0)
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)
            labels[n:] = -100  # padding rows are never scored
            # position t predicts token t+1: score labels[:, 1:] with the logits at [:, :-1]
            targets = labels[:, 1:]
            positions = torch.zeros_like(labels, dtype=torch.bool)
            positions[:, :-1] = targets != -100
            logits = _response_logits(model, input_ids, attention_mask, positions, static if shape else None)
            token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[targets != -100].unsqueeze(-1)).squeeze(-1)
            counts = (targets[:n] != -100).sum(dim=1)
            row_of = torch.arange(targets.shape[0], device=device).unsqueeze(1).expand_as(targets)[targets != -100]
            sums = torch.zeros(targets.shape[0], device=device, dtype=torch.float32).index_add_(0, row_of, token_lp)
            for total, m in zip(sums[:n].cpu().tolist(), counts.cpu().tolist()):
                scores.append(total / m if m else float("-inf"))
    return scores
