"""Sampled decoding on a static KV cache, each step (forward, chosen log-probability, greedy rows,
temperature, top-p, sampling, stop bookkeeping) one compiled function replayed as a CUDA graph.

transformers' ``generate`` compiles only the model's forward: around it, each decoding step runs its
logits processors, sampling and stopping criteria as separate Python calls and kernel launches, and
checks on the host whether every row has stopped. With SmolLM2-135M on an H100 a step took 3.3 ms
for 4 rows and 4.6 ms for 64 (``benchmarks/results/static_decoding_probe_h100.json``): a floor that
does not grow with the rows, as per-step host work would give. Here the whole step is one ``torch.compile`` graph (mode ``reduce-overhead``: CUDA graphs) per (rows, cache
length) bucket, and the host asks whether all rows have stopped every ``CHECK_EVERY`` steps.

It computes what ``generate`` with the same settings computes (tests compare them): the prompt is
prefilled in one eager forward; each step's logits (float32) give the chosen token's log-probability
before temperature and top-p (``generator_logprob``); greedy rows take the most likely token; the
others sample from softmax(logits / temperature) cut to the top-p nucleus, as transformers'
``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` do; a row that has produced a stop id pads the
rest. Draws differ from ``generate``'s (another sampling kernel), not their distribution.
``plain_sampling`` says whether a model's generation config adds processors of its own (repetition
penalty, suppressed ids, ...), in which case ``generate`` keeps decoding it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: Steps between the host's checks whether every row has stopped (each check waits for the GPU).
CHECK_EVERY = 8

# generation-config fields whose processors the loop does not apply; a model whose config sets one
# away from its neutral value decodes with ``generate``
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "encoder_repetition_penalty": (None, 1.0),
            "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
            "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
            "exponential_decay_length_penalty": (None,), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
            "typical_p": (None, 1.0), "min_p": (None,), "guidance_scale": (None, 1.0), "watermarking_config": (None,)}  # fmt: skip


def plain_sampling(model: Any) -> bool:
    """Whether ``model``'s generation config adds no logits processor beyond what the loop applies."""
    cfg = getattr(model, "generation_config", None)
    return cfg is None or all(getattr(cfg, name, None) in neutral for name, neutral in _NEUTRAL.items())


@torch.library.custom_op("duetto::cumsum_last", mutates_args=())
def cumsum_last(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)`` of a floating-point ``x`` as one opaque op: inside a compiled step the graph
    calls aten's cumsum kernel. Inductor's own code for a scan along a whole vocabulary (a split scan)
    failed to generate in torch 2.11 (``InductorError: list indices must be integers or slices, not
    NoneType`` for a SplitScan of cumsum over 128 rows x SmolLM2's 49,152 columns on an H100)."""
    if not x.is_floating_point():
        raise TypeError(f"cumsum_last takes floating-point tensors, got {x.dtype}")
    return x.cumsum(dim=-1)


@cumsum_last.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # cumsum's output: contiguous


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor,
                stop_ids: torch.Tensor, allow_stop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(next token, its log-probability) per row from float32 ``logits`` (rows, vocab).

    ``temperature`` and ``top_p`` are (rows, 1); ``greedy`` (rows,) bool picks the most likely token;
    ``allow_stop`` (0-dim bool) False forbids the stop ids (``min_new_tokens``), as transformers'
    min-new-tokens processor does before anything else sees the logits."""
    logits = torch.where(allow_stop | ~_is_stop_column(logits, stop_ids), logits, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    scores = logits / temperature
    sorted_scores, order = torch.sort(scores, dim=-1)  # ascending, as TopPLogitsWarper sorts
    cumulative = cumsum_last(sorted_scores.softmax(dim=-1))
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)
    probs = scores.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # one draw per row from probs: argmax of probs / Exp(1) noise (the exponential race)
    sampled = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)
    token = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def _is_stop_column(logits: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """(1, vocab) bool: which columns are stop ids."""
    cols = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return cols.index_fill(0, stop_ids, True).unsqueeze(0)


class DecodeSteps:
    """The decoding step of one model and one static cache (a (rows, length) bucket): compiled on CUDA
    (CUDA graphs), eager elsewhere."""

    def __init__(self, model: Any, cache: Any, length: int, compile: bool):
        from duetto.trainers.inference import _cache_kwarg  # generate's keyword for the cache is the forward's

        self.model, self.cache, self.length = model, cache, length
        self.cache_kw = _cache_kwarg()
        self.step: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = self._step
        if compile:
            # automatic dynamic shapes: the second bucket compiled makes the changed sizes symbolic, so
            # the rest reuse that compilation (CUDA graphs are still recorded per shape)
            self.step = torch.compile(self._step, mode="reduce-overhead")

    def forward_logits(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: self.cache})  # fmt: skip
        return out.logits[:, -1, :].float()

    def _step(self, tokens, positions, mask, temperature, top_p, greedy, stop_ids, allow_stop, finished, pad):
        logits = self.forward_logits(tokens, mask, positions)
        token, logp = sample_next(logits, temperature, top_p, greedy, stop_ids, allow_stop)
        token = torch.where(finished, pad, token)  # a row that has stopped pads the rest
        return token, logp, finished | torch.isin(token, stop_ids)


def decode(steps: DecodeSteps, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, top_p: float, greedy_rows: Sequence[bool], stop_ids: Sequence[int], pad_id: int,
           min_new_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Decode left-padded ``input_ids`` (rows, prompt) into ``steps``' emptied static cache; returns the new
    tokens (rows, n <= max_new_tokens; pad after a row's stop id) and each one's log-probability.
    ``temperature`` 0: every row greedy."""
    rows, prompt = input_ids.shape
    length = steps.length
    if prompt + max_new_tokens > length:
        raise ValueError(f"prompt {prompt} + {max_new_tokens} new tokens exceed the cache's {length}")
    device = input_ids.device
    mask = torch.zeros(rows, length, dtype=attention_mask.dtype, device=device)
    mask[:, :prompt] = attention_mask
    mask[:, prompt:] = 1  # causality hides the positions not yet decoded
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    all_greedy = temperature == 0
    temp = torch.full((rows, 1), 1.0 if all_greedy else float(temperature), device=device)
    nucleus = torch.full((rows, 1), 1.0 if all_greedy else float(top_p), device=device)
    greedy = torch.tensor([all_greedy or bool(g) for g in greedy_rows], dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)  # may be empty: nothing stops
    pad = torch.tensor(pad_id, device=device)
    yes, no = torch.tensor(True, device=device), torch.tensor(False, device=device)

    logits = steps.forward_logits(input_ids, mask, positions)  # prefill, eager (one shape per prompt width)
    token, logp = sample_next(logits, temp, nucleus, greedy, stops, yes if min_new_tokens <= 0 else no)
    finished = torch.isin(token, stops)
    tokens, logps = [token], [logp]
    position = positions[:, -1:] + 1
    for t in range(1, max_new_tokens):
        if t % CHECK_EVERY == 0 and bool(finished.all()):
            break
        token, logp, finished = steps.step(token.unsqueeze(-1), position, mask, temp, nucleus, greedy, stops,
                                           yes if t >= min_new_tokens else no, finished, pad)  # fmt: skip
        # a replayed graph's outputs are overwritten by its next replay: keep copies
        token, logp, finished = token.clone(), logp.clone(), finished.clone()
        tokens.append(token)
        logps.append(logp)
        position = position + 1
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)
