"""Generate k candidates, score them with a second model, pick one: plain functions, no Ray.

The Serve app runs these steps in separate deployments (generator, reranker, ingress); the report and
the naive benchmark call ``ensemble_generate`` to run them in one process. Both paths therefore
produce the same candidates and scores for the same seed.

Scores are length-normalised so long and short answers compete fairly:
- ``generator_logprob``: mean log-probability per generated token under the generator's *raw*
  distribution (before temperature / top-p), stop token included when one was produced.
- ``reranker_score``: mean log-likelihood of the response tokens given the prompt under the
  reranker, with the prompt/response encoding (and label mask) its training used.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("reranker", "mix", "generator", "reranker-greedy")

# Logits of the response positions are computed in slices of this many positions, so a 262k vocabulary
# (Gemma 3) never materialises a rows x seq x vocab tensor.
_LOGIT_POSITIONS_PER_SLICE = 2048

# torch.manual_seed is process-global; hold this while seeding + sampling so concurrent callers in
# one process (threads of a replica) cannot interleave draws.
_SAMPLING_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    """A model ready for inference with what the ensemble needs to prompt it the way it was trained."""

    model: Any
    tokenizer: Any
    template: str
    stop_ids: list[int]
    max_seq_len: int
    """Longest prompt + response it is asked to handle (its context window)."""
    name: str = ""


@dataclass
class Candidate:
    text: str
    generator_logprob: float | None = None
    reranker_score: float | None = None
    tokens: int = 0
    """Generated tokens, the stop token included when one was produced."""
    finish_reason: str = "stop"
    """stop = the model ended the answer; length = cut at max_new_tokens."""
    token_ids: list[int] = field(default_factory=list)
    """The generated ids (stop token included) the log-prob was computed over."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EnsembleRequest:
    instruction: str
    input: str = ""
    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None


@dataclass
class EnsembleResult:
    response: str
    candidates: list[Candidate]
    chosen_index: int
    mode: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "response": self.response,
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen_index": self.chosen_index,
            "mode": self.mode,
            "timings_ms": self.timings_ms,
        }


def prompt_text(tokenizer: Any, template: str, instruction: str, input: str = "") -> str:
    from duetto.data.prompts import build_prompt

    return build_prompt(instruction, input or "", template=template, tokenizer=tokenizer)


def count_prompt_tokens(tokenizer: Any, template: str, instruction: str, input: str = "") -> int:
    """Prompt length in the ids the model receives (BOS included, as training encodes it)."""
    from duetto.data.prompts import encode_prompt

    return len(encode_prompt(prompt_text(tokenizer, template, instruction, input), tokenizer))


def stop_suffix_tokens(tokenizer: Any, template: str) -> int:
    """Tokens scoring appends after a response (EOS or the chat end-of-turn)."""
    from duetto.data.prompts import response_end

    return len(tokenizer(response_end(tokenizer, template), add_special_tokens=False)["input_ids"])


def _first_stop(ids: Sequence[int], stop: set[int]) -> int | None:
    for i, t in enumerate(ids):
        if t in stop:
            return i
    return None


def generate_candidates(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    k: int | Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
    stop_ids: Sequence[int] | None = None,
) -> list[list[Candidate]]:
    """Sample ``k`` candidates per templated prompt in one batched ``generate`` call.

    ``k`` may differ per prompt (each prompt's row is repeated k times, which is what
    ``num_return_sequences`` does, so requests with different k share one call). temperature 0 means
    greedy decoding: one candidate per prompt whatever k says (k greedy copies would be identical).
    """
    import torch

    from duetto.data.prompts import encode_prompt, pad_batch
    from duetto.models import ensure_pad_token, stop_token_ids

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
    if not rows:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    # Same prompt ids as training (BOS once), left-padded so every row continues from its right edge.
    encoded = {p: encode_prompt(p, tokenizer) for p in set(rows)}
    enc = pad_batch([{"input_ids": encoded[p]} for p in rows], tokenizer.pad_token_id, side="left")
    enc = {key: v.to(device) for key, v in enc.items()}
    gen_kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    if greedy:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    with _SAMPLING_LOCK, torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**enc, **gen_kwargs)
        # Raw log-softmax of each chosen token: the model's own probability, not the warped sampler's.
        # Step by step, so a 262k vocabulary never needs a steps x rows x vocab tensor.
        gen_ids = out.sequences[:, enc["input_ids"].shape[1] :]
        logp = torch.stack(
            [
                torch.log_softmax(step.float(), dim=-1).gather(-1, gen_ids[:, t : t + 1]).squeeze(-1)
                for t, step in enumerate(out.logits)
            ],
            dim=1,
        ).cpu()
        del out.logits
    new_ids = gen_ids.cpu().tolist()
    flat: list[Candidate] = []
    for ids, lp in zip(new_ids, logp):
        end = _first_stop(ids, stop_set)
        n = len(ids) if end is None else end + 1
        text_ids = ids if end is None else ids[:end]
        mean_lp = float(lp[:n].sum() / max(n, 1))
        flat.append(
            Candidate(
                text=tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
                generator_logprob=mean_lp,
                tokens=n,
                finish_reason="length" if end is None else "stop",
                token_ids=[int(t) for t in ids[:n]],
            )
        )
    grouped, i = [], 0
    for n in ks:
        grouped.append(flat[i : i + n])
        i += n
    return grouped


def _response_logits(model: Any, input_ids: Any, attention_mask: Any, positions: Any) -> Any:
    """Logits at ``positions`` (a boolean rows x seq mask) without a full rows x seq x vocab tensor."""
    import torch

    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        decoder = head = None
    if decoder is None or head is None:  # unusual architecture: the plain forward is always right
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions].float()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[positions]
    cap = getattr(getattr(model.config, "text_config", None) or model.config, "final_logit_softcapping", None)
    parts = []
    for s in range(0, hidden.shape[0], _LOGIT_POSITIONS_PER_SLICE):
        logits = head(hidden[s : s + _LOGIT_POSITIONS_PER_SLICE]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        parts.append(logits)
    return torch.cat(parts) if parts else hidden.new_zeros((0, head.weight.shape[0])).float()


def score_candidates(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str, str]],
    *,
    template: str,
    max_seq_len: int,
    batch_rows: int = 32,
) -> list[float]:
    """Mean log-likelihood per response token of each (instruction, input, response) under ``model``.

    Each pair is encoded exactly like a training example (same template, stop token appended,
    prompt tokens masked out of the labels), padded, and scored ``batch_rows`` rows per forward.
    """
    import torch

    from duetto.data.prompts import encode_example, pad_batch
    from duetto.models import ensure_pad_token

    ensure_pad_token(tokenizer)
    device = next(model.parameters()).device
    feats = []
    for instruction, inp, response in pairs:
        enc = encode_example(
            {"instruction": instruction, "input": inp or "", "response": response},
            tokenizer,
            template=template,
            max_seq_len=max_seq_len,
        )
        feats.append({key: enc[key] for key in ("input_ids", "attention_mask", "labels")})
    scores: list[float] = []
    with torch.inference_mode():
        for s in range(0, len(feats), batch_rows):
            batch = pad_batch(feats[s : s + batch_rows], tokenizer.pad_token_id, side="right")
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            labels = batch["labels"].to(device)
            # position t predicts token t+1: score labels[:, 1:] with the logits at [:, :-1]
            targets = labels[:, 1:]
            positions = torch.zeros_like(labels, dtype=torch.bool)
            positions[:, :-1] = targets != -100
            logits = _response_logits(model, input_ids, attention_mask, positions)
            token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[targets != -100].unsqueeze(-1)).squeeze(-1)
            counts = (targets != -100).sum(dim=1)
            row_of = torch.arange(targets.shape[0], device=device).unsqueeze(1).expand_as(targets)[targets != -100]
            sums = torch.zeros(targets.shape[0], device=device, dtype=torch.float32).index_add_(0, row_of, token_lp)
            for total, n in zip(sums.cpu().tolist(), counts.cpu().tolist()):
                scores.append(total / n if n else float("-inf"))
    return scores


def combined_score(c: Candidate, mode: str, weight: float) -> float:
    if mode == "reranker" or mode == "reranker-greedy":
        if c.reranker_score is None:
            raise ValueError(f"mode {mode}: candidate has no reranker_score")
        return c.reranker_score
    if mode == "generator":
        if c.generator_logprob is None:
            raise ValueError("mode generator: candidate has no generator_logprob")
        return c.generator_logprob
    if mode == "mix":
        if c.reranker_score is None or c.generator_logprob is None:
            raise ValueError("mode mix: candidate needs both reranker_score and generator_logprob")
        return (1.0 - weight) * c.reranker_score + weight * c.generator_logprob
    raise ValueError(f"mode: one of {', '.join(MODES)}, got {mode!r}")


def choose(candidates: Sequence[Candidate], mode: str = "reranker", weight: float = 0.5) -> int:
    """Index of the best candidate under ``mode``; ties go to the earliest (the first sample)."""
    if not candidates:
        raise ValueError("choose: no candidates")
    if mode == "reranker-greedy" and candidates[0].reranker_score is None:
        return 0  # one greedy answer from the reranker model: nothing to compare
    scores = [combined_score(c, mode, weight) for c in candidates]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def needs_generator(mode: str) -> bool:
    return mode != "reranker-greedy"


def needs_reranker_scores(mode: str) -> bool:
    return mode in ("reranker", "mix")


def _settings_groups(requests: Sequence[EnsembleRequest]) -> dict[tuple, list[int]]:
    """Requests that can share one generate call: equal max_new_tokens, temperature and top_p (k may
    differ). A seeded request samples alone, so its draws never depend on what it was batched with."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (r.max_new_tokens, r.temperature, r.top_p, i if r.seed is not None else None)
        groups.setdefault(key, []).append(i)
    return groups


def sample_requests(
    lm: LoadedModel, requests: Sequence[EnsembleRequest], *, greedy: bool = False
) -> list[list[Candidate]]:
    """Candidates for each request from ``lm``, one generate call per group of equal settings.
    greedy=True decodes one greedy answer per request (the reranker-greedy comparison mode)."""
    out: list[list[Candidate]] = [[] for _ in requests]
    for (max_new, temperature, top_p, _), idxs in _settings_groups(requests).items():
        prompts = [prompt_text(lm.tokenizer, lm.template, requests[i].instruction, requests[i].input) for i in idxs]
        cands = generate_candidates(
            lm.model, lm.tokenizer, prompts, [1 if greedy else requests[i].k for i in idxs],
            max_new_tokens=max_new, temperature=0.0 if greedy else temperature, top_p=top_p,
            seed=requests[idxs[0]].seed, stop_ids=lm.stop_ids,
        )  # fmt: skip
        for i, cs in zip(idxs, cands):
            out[i] = cs
    return out


def score_requests(
    lm: LoadedModel,
    requests: Sequence[EnsembleRequest],
    candidates: Sequence[Sequence[Candidate]],
    *,
    batch_rows: int = 32,
) -> None:
    """Set ``reranker_score`` on every candidate: one padded scoring pass over all of them."""
    pairs = [(r.instruction, r.input, c.text) for r, cs in zip(requests, candidates) for c in cs]
    scores = iter(
        score_candidates(
            lm.model, lm.tokenizer, pairs, template=lm.template, max_seq_len=lm.max_seq_len, batch_rows=batch_rows
        )
    )
    for cs in candidates:
        for c in cs:
            c.reranker_score = next(scores)


def ensemble_generate(
    generator: LoadedModel | None,
    reranker: LoadedModel | None,
    requests: Sequence[EnsembleRequest],
    *,
    mode: str = "reranker",
    weight: float = 0.5,
    score_rows: int = 32,
) -> list[EnsembleResult]:
    """The whole pipeline in one process: sample, score, choose. The Serve app runs the same three
    steps in its generator, reranker and ingress deployments."""
    import time

    if mode not in MODES:
        raise ValueError(f"mode: one of {', '.join(MODES)}, got {mode!r}")
    if needs_generator(mode) and generator is None:
        raise ValueError(f"mode {mode} needs a generator")
    if mode != "generator" and reranker is None:
        raise ValueError(f"mode {mode} needs a reranker")
    t0 = time.perf_counter()
    if mode == "reranker-greedy":
        assert reranker is not None
        cands = sample_requests(reranker, requests, greedy=True)
        for cs in cands:  # the greedy answer's own mean log-prob is the reranker's view of it
            for c in cs:
                c.reranker_score, c.generator_logprob = c.generator_logprob, None
    else:
        assert generator is not None
        cands = sample_requests(generator, requests)
    t_gen = (time.perf_counter() - t0) * 1000.0
    t1 = time.perf_counter()
    if needs_reranker_scores(mode):
        assert reranker is not None
        score_requests(reranker, requests, cands, batch_rows=score_rows)
    t_score = (time.perf_counter() - t1) * 1000.0
    results = []
    for cs in cands:
        j = choose(cs, mode, weight)
        results.append(
            EnsembleResult(
                response=cs[j].text,
                candidates=cs,
                chosen_index=j,
                mode=mode,
                timings_ms={"generate": t_gen, "score": t_score, "total": t_gen + t_score},
            )  # fmt: skip
        )
    return results
