"""Train several QLoRA trial configs together, each as `duetto train` would train it alone.

Each trial keeps what makes it itself: its LoRA init (the trial's own method build under its seed),
its data order (the HF Trainer's: a permutation of the train rows per epoch, seeded with data_seed +
epoch), its AdamW, learning-rate schedule and gradient clip. What the trials share is the frozen,
quantized base, which every step runs once over all trials' rows (trainers/packed_lora.py). The base
runs without activation checkpointing (it saves memory, it does not change the gradients; a pack
sizes itself from the memory its steps take), and on a GPU each step's forward, backward and every
trial's gradient clip replay as one CUDA graph.

After training, each trial is evaluated (eval loss, BLEU/ROUGE of greedy answers) through the packed
model with only its own adapter active, and saved as a PEFT adapter folder.

`duetto sweep` runs a Pack inside a packing actor (tune/packing.py); ``train_packed`` runs one in
this process.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from duetto.trainers.config import TrialConfig
from duetto.trainers.pack_groups import check_packable, shared_settings
from duetto.trainers.packed_lora import (
    LoraSpec,
    PackedTrials,
    TrialOptim,
    load_peft_adapter,
    pack_lora,
    peft_adapter_state,
    stacked_tensors,
)

#: CUDA graphs a pack keeps: every step runs a block for each attached trial (one not stepping gets
#: rows without labels), so the trials attached have one graph; a graph holds its activations' memory
GRAPHS_KEPT = 1
#: How long the trials of a pack that are ahead wait for those furthest behind to be moved on by
#: their clients (a report's checkpoint and Tune's handling of it take seconds) before they step
#: without them (Pack.to_step)
LOCKSTEP_HOLD_SECONDS = 30.0


def hf_batches(n: int, batch_size: int, data_seed: int) -> Iterator[list[int]]:
    """The HF Trainer's batches of row indices, epoch after epoch: accelerate's SeedableRandomSampler,
    which the Trainer's data loader samples with (each pass reseeds it with data_seed + epoch), cut
    into ``batch_size`` rows; an epoch's last batch holds the rows left (the loader keeps it)."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = SeedableRandomSampler(range(n), data_seed=data_seed)
    while True:
        order = list(sampler)
        for s in range(0, n, batch_size):
            yield order[s : s + batch_size]


def unlabelled(row: dict) -> dict:
    """``row`` with no label token: it fills a short batch up to the pack's row count and changes no
    loss (a trial's loss is the mean over its label tokens) and no gradient."""
    return {**row, "labels": [-100] * len(row["labels"])}


def warmup_steps(cfg: TrialConfig, total: int) -> int:
    """The HF Trainer's warm-up steps: warmup_ratio of the total steps rounded up (a value >= 1 is a count)."""
    return int(cfg.warmup_ratio if cfg.warmup_ratio >= 1 else math.ceil(total * cfg.warmup_ratio))


def total_steps(cfg: TrialConfig, n_rows: int) -> int:
    """The HF Trainer's optimizer steps: max_steps, else epochs x batches per epoch, rounded up."""
    return cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * math.ceil(n_rows / cfg.batch_size))


@dataclass
class PackedTrial:
    cfg: TrialConfig
    rows: Any
    dataset: Any
    order: Iterator[list[int]]
    """Its batches' row indices (hf_batches)."""
    total: int
    step: int = 0
    until: int = 0
    """The trial runs while step < until (a Tune client moves it on report by report)."""
    losses: list[float] = field(default_factory=list)
    trained_tokens: int = 0
    step_seconds: float = 0.0
    """Time of the pack steps' forward, backward and optimizer steps this trial took part in (shared
    with the trials beside it), a restored trial's earlier attempts included: its tokens/s."""
    step_wall: float = 0.0
    """Wall time of the pack steps it took part in since it joined (their batch collation included)."""
    joined_at: float = 0.0
    """When its join began (its wall time counts from there, as a trial alone counts its set-up)."""
    setup_seconds: float = 0.0
    """Its join: rows, tokenization, the method's build, its adapter or model in place, a restore."""
    report_seconds: float = 0.0
    """Wall time of the interim reports it took part in since it joined (each one whole: shared with
    the trials reported beside it)."""
    trainable_params: int = 0
    resumed_from: int = 0
    """The step its saved state (``Pack.state``) brought it back to (0: trained from the start)."""
    reported: int = -1
    """The step of its last interim report (a report is due at ``until`` until it is made)."""
    replayed: int = 0
    """Steps it took in a replayed CUDA graph of the pack's forward and backward."""
    refresh_wall: float = 0.0
    """Of ``step_wall``: the steps at which a trial of its pack refreshed its GaLore projections (an SVD
    per weight)."""


class CudaMemory:
    """The GPU memory a pack reads to size itself: total, allocated now, and the peak since the last reset."""

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


class Pack:
    """QLoRA trials sharing one base: ``join`` adds a trial (its LoRA init, data order, optimizer and
    schedule as `duetto train` makes them), ``step`` runs one step of every trial allowed to run,
    ``finish`` evaluates and saves one, ``leave`` drops one. Not thread-safe: one caller at a time.

    ``has_room`` says whether one more trial may join: at most ``max_trials`` (0: no count limit) and,
    where GPU memory is measured (``memory``: CUDA by default), what the steps so far took per trial
    times one more trial, on top of the base and the joining trial's build of a whole base, within
    ``memory_fraction`` of the GPU. Until a first step has measured a trial's share, one trial at a
    time is admitted."""

    #: CUDA graphs the pack keeps at most, each holding its step's activations (see capacity)
    graphs_kept = GRAPHS_KEPT

    def __init__(self, device: torch.device, max_trials: int = 0, memory_fraction: float = 0.9,
                 memory: CudaMemory | None = None):  # fmt: skip
        from duetto.models import use_attention_kernels_without_plans

        use_attention_kernels_without_plans(device)
        self.device = device
        self.trials: dict[int, PackedTrial] = {}
        self.base: Any = None
        self.layers: dict = {}
        self.optim: PackedTrials | None = None
        self.tokenizer: Any = None
        self.model_path = ""
        self.max_trials = max_trials
        self.memory_fraction = memory_fraction
        self.memory = memory if memory is not None else (CudaMemory(device) if device.type == "cuda" else None)
        self.base_bytes = 0
        """Memory allocated once the base is built, before any adapter."""
        self.trial_bytes = 0
        """One trial's share of a step's peak above the base (adapter, its optimizer state, its rows'
        activations), measured at the step with the most trials so far."""
        self._measured_with = 0
        self.peak_bytes = 0
        """The highest step peak so far (what a trial reports as its training peak)."""
        self._side: torch.cuda.Stream | None = None
        """The stream every graph of the pack warms up and captures on."""
        self.graph_blocker: str | None = None
        """Why the base's steps cannot be captured (prepare_for_graphs), or None."""
        self._replayed = False
        """Whether the last step's forward and backward were a graph replay."""
        self._join_started = 0.0
        """When the join in progress began (_prepare starts a join, _admit ends it)."""
        self._hold: tuple[tuple, float] | None = None
        """((lowest step, the trials there that wait for their clients), when the others began to wait
        for them) (to_step)."""
        self.graphs: dict[tuple, Any] = {}
        """(adapter stack version, trials, row bounds) -> the GraphedStep of their forward and backward (on
        CUDA, unless the trials say cuda_graphs: false), most recently used last."""

    def _autocast_bf16(self) -> bool:
        """Whether the trials' steps and evaluations run under bf16 autocast, as a trial alone's HF
        Trainer runs them (trainers/trial.py resolve_dtype: on a GPU by default; ``bf16-mixed`` anywhere).
        The pack's trials share ``precision``."""
        from duetto.trainers.trial import resolve_dtype

        cfg = next(iter(self.trials.values())).cfg
        return resolve_dtype(cfg.precision, self.device.type == "cuda")[1]

    def _autocast(self):
        """The trials' evaluation autocast (``_autocast_bf16``) as a context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast_bf16())

    def has_room(self) -> bool:
        n = len(self.trials)
        if self.max_trials and n >= self.max_trials:
            return False
        if self.memory is None or n == 0:
            return True
        cap = self.capacity()  # None: nothing measured yet, so the first step tells what a trial takes
        return cap is not None and n < cap

    def capacity(self) -> int | None:
        """Trials the measured memory holds (None: not measured, or no memory limit): the base, a joining
        trial's build of a whole base for a moment (it then keeps only its adapter) and each trial's
        measured share, within memory_fraction of the GPU."""
        if self.memory is None or not self.trial_bytes:
            return None
        # each graph a pack keeps holds its step's activations in a pool of its own
        per_trial = self.trial_bytes * (self.graphs_kept if self.uses_graphs() else 1)
        fit = int((self.memory_fraction * self.memory.total() - 2 * self.base_bytes) // per_trial)
        return min(fit, self.max_trials) if self.max_trials else fit

    def join(self, cfg: TrialConfig, until: int | None = None, state: bytes | None = None) -> int:
        """Add a trial (``state``: one that ``Pack.state`` saved, to go on from its step); returns its id."""
        rows, dataset, dtype = self._prepare(cfg)  # the method's build (LoRA init) follows the seed, as alone
        from peft import get_peft_model_state_dict

        from duetto.trainers.compat import checkpointing_off
        from duetto.trainers.methods import get_method

        built = get_method("qlora").build(cfg, self.model_path, dtype, self.device)
        init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(built.model).items()}
        spec = LoraSpec(r=cfg.qlora.r, alpha=cfg.qlora.alpha, dropout=cfg.qlora.dropout)
        if self.base is None:
            self.base = built.model.unload()  # the prepared, quantized base without LoRA layers
            # a pack sizes itself from the memory its steps take; recomputing every layer's forward in
            # backward (activation checkpointing) would add work to each step and changes no gradient
            checkpointing_off(self.base)
            if self.device.type == "cuda":  # LLM.int8 layers: the same matmul without a host wait in each
                from duetto.trainers.graph_step import prepare_for_graphs

                self.graph_blocker = prepare_for_graphs(self.base)
            self.layers = pack_lora(self.base, cfg.qlora.target_modules, [])
            self.optim = PackedTrials(self.layers)
        del built
        if self.memory is not None and not self.trials:  # the base alone (this trial's build freed)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.base_bytes = self.memory.allocated()
        (t,) = {layer.add_adapter(spec) for layer in self.layers.values()}  # the same index in every layer
        load_peft_adapter(self.layers, t, init)
        total = total_steps(cfg, len(dataset))
        # on a GPU with graphs, the fused AdamW of a trial alone on the fast path (trainers/trial.py)
        fused = self.device.type == "cuda" and cfg.cuda_graphs is not False
        self.optim.add(t, TrialOptim(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=1.0,
                                     warmup_steps=warmup_steps(cfg, total), total_steps=total, scheduler=cfg.lr_scheduler,
                                     fused=fused))  # fmt: skip
        trainable = sum(p.numel() for layer in self.layers.values() for p in layer.adapter_params(t))
        return self._admit(t, cfg, rows, dataset, total, trainable, until, state)

    def _prepare(self, cfg: TrialConfig) -> tuple[Any, Any, torch.dtype]:
        """A joining trial's check against the pack, then its seed, rows and tokenized train set, as the
        trial's own _setup makes them; (rows, dataset, weights dtype). The first trial loads the tokenizer.
        A join starts here (its set-up, first imports included, as a trial alone's); _admit ends it."""
        self._join_started = time.perf_counter()
        from transformers import set_seed

        from duetto.models import load_tokenizer, resolve_model
        from duetto.trainers.trial import resolve_dtype
        from duetto.trainers.trial_data import EncodedDataset, load_rows

        check_packable([*(tr.cfg for tr in list(self.trials.values())[:1]), cfg])
        if not self.model_path:
            self.model_path = resolve_model(cfg.model)
            self.tokenizer = load_tokenizer(self.model_path)
        set_seed(cfg.seed)
        rows = load_rows(cfg)
        dataset = EncodedDataset(rows.train, self.tokenizer, cfg.template, cfg.max_seq_len)
        return rows, dataset, resolve_dtype(cfg.precision, self.device.type == "cuda")[0]

    def _admit(self, t: int, cfg: TrialConfig, rows: Any, dataset: Any, total: int, trainable: int,
               until: int | None, state: bytes | None) -> int:  # fmt: skip
        """Trial t (its weights and optimizer in place) joins the running trials, from ``state`` if given."""
        self.trials[t] = PackedTrial(cfg, rows, dataset, hf_batches(len(dataset), cfg.batch_size, cfg.seed), total,
                                     until=total if until is None else until, joined_at=self._join_started,
                                     trainable_params=trainable)  # fmt: skip
        if state is not None:
            try:
                self._restore(t, state)
            except BaseException:  # a trial that never joined holds no slot (nor the pack's lockstep)
                self.leave(t)
                raise
        self.trials[t].setup_seconds = time.perf_counter() - self._join_started
        return t

    def state(self, t: int) -> bytes:
        """Trial t at its current step, as the bytes of a checkpoint file: its adapter, its AdamW and
        schedule, and its progress (step, losses, tokens, seconds). ``join(cfg, state=...)`` goes on
        from there: the same updates and data order as if it had never stopped (with LoRA dropout 0:
        the dropout masks come from the pack's one random stream, shared by its trials)."""
        import io

        tr = self.trials[t]
        saved = {**self._trial_state(t), "step": tr.step, "losses": list(tr.losses), "trained_tokens": tr.trained_tokens,
                 "step_seconds": tr.step_seconds, "settings": shared_settings(tr.cfg)}  # fmt: skip
        buf = io.BytesIO()
        torch.save(saved, buf)
        return buf.getvalue()

    def _restore(self, t: int, state: bytes) -> None:
        import io

        from duetto.config import ConfigError

        tr = self.trials[t]
        saved = torch.load(io.BytesIO(state), map_location=self.device, weights_only=True)
        if saved["settings"] != shared_settings(tr.cfg):
            raise ConfigError(f"a packed trial's checkpoint was saved with other settings: {saved['settings']}")
        self._load_trial_state(t, saved)
        tr.step = tr.resumed_from = int(saved["step"])
        tr.losses = [float(x) for x in saved["losses"]]
        tr.trained_tokens, tr.step_seconds = int(saved["trained_tokens"]), float(saved["step_seconds"])
        for _ in range(tr.step):  # the batches its steps so far took
            next(tr.order)

    def _trial_state(self, t: int) -> dict[str, Any]:
        """What trial t's checkpoint holds besides its progress: its adapter, AdamW and schedule."""
        return {"adapter": {k: v.cpu() for k, v in peft_adapter_state(self.layers, t).items()},
                "optimizer": self.optim.optimizers[t].state_dict(), "scheduler": self.optim.schedulers[t].state_dict()}

    def _load_trial_state(self, t: int, saved: dict[str, Any]) -> None:
        load_peft_adapter(self.layers, t, saved["adapter"])
        self.optim.load_optimizer_state(t, saved["optimizer"])
        self.optim.schedulers[t].load_state_dict(saved["scheduler"])

    def runnable(self) -> list[int]:
        return [t for t, tr in self.trials.items() if tr.step < min(tr.until, tr.total)]

    def to_step(self, now: float) -> tuple[list[int], float | None]:
        """The trials a pack driven by clients (tune/packing.py) steps next, at time ``now`` (seconds, a
        monotonic clock), and how long to wait before asking again when it is none (None: until a
        client moves a trial on). Trials step in lockstep: those furthest behind step, those ahead wait
        for them, so that steps and reports hold every trial at once (on a GPU one trial's step costs
        about what eight trials' step does, and each new set of trials stepping together is a new
        CUDA graph). While one of the trials furthest behind waits at a report for its client, the others
        wait too, at most LOCKSTEP_HOLD_SECONDS, then step without it."""
        training = {t: tr for t, tr in self.trials.items() if tr.step < tr.total}
        live = [t for t, tr in training.items() if tr.step < tr.until]
        if not live:
            return [], None
        lowest = min(tr.step for tr in training.values())
        behind = [t for t in live if training[t].step == lowest]
        waiting = frozenset(t for t, tr in training.items() if tr.step == lowest and tr.step >= tr.until)
        if not waiting:
            return behind, None
        # each wait is for these trials at this step: a wait that ran out is not waited again, and
        # another one (a trial left, the pack moved on) waits afresh
        if self._hold is None or self._hold[0] != (lowest, waiting):
            self._hold = ((lowest, waiting), now)
        left = LOCKSTEP_HOLD_SECONDS - (now - self._hold[1])
        return (behind or live, None) if left <= 0 else ([], left)

    def step(self, trials: Sequence[int] | None = None) -> dict[int, float]:
        """One step of every runnable trial together (of ``trials`` alone, if given); {trial: its loss}."""
        from duetto.trainers.trial_data import PaddingCollator

        live = [t for t in self.runnable() if trials is None or t in trials]
        if not live:
            return {}
        started = time.perf_counter()
        width = next(iter(self.trials.values())).cfg.max_seq_len  # one width: the trials' rows stack
        collate = PaddingCollator(self.tokenizer.pad_token_id, width=width)
        batches, tokens = {}, {}
        for t in live:
            tr = self.trials[t]
            rows = [tr.dataset[i] for i in next(tr.order)]
            tokens[t] = sum(sum(r["attention_mask"]) for r in rows)
            # every block of a step has batch_size rows (the trials' rows stack); an epoch's short last
            # batch is filled with rows that carry no label
            rows += [unlabelled(rows[0])] * (tr.cfg.batch_size - len(rows))
            batches[t] = {k: v.to(self.device) for k, v in collate(rows).items()}
        if self.memory is not None:
            self.memory.reset_peak()
        self._replayed = False
        refreshing = self._refreshing(live)
        t0 = time.perf_counter()
        losses = self._train(batches)  # its read of the losses waits for the GPU: the step is done
        seconds = time.perf_counter() - t0
        replayed = self._replayed
        if self.memory is not None:
            peak = self.memory.peak()
            self.peak_bytes = max(self.peak_bytes, peak)
            # the most trials: the overheads shared by all weigh least; a replay's activations live in
            # its graph's pool, which max_memory_allocated does not see, so eager steps measure
            # every attached trial has a block in a step (those not stepping: rows without labels)
            if not replayed and len(self.trials) >= self._measured_with:
                self._measured_with = len(self.trials)
                self.trial_bytes = max(1, (peak - self.base_bytes) // len(self.trials))
        wall = time.perf_counter() - started
        for t, loss in losses.items():
            tr = self.trials[t]
            tr.step += 1
            tr.losses.append(loss)
            tr.step_seconds += seconds
            tr.step_wall += wall
            tr.refresh_wall += wall if refreshing else 0.0
            tr.trained_tokens += tokens[t]
            tr.replayed += replayed
        return losses

    def _refreshing(self, live: Sequence[int]) -> bool:
        """Whether the next step of these trials refreshes a GaLore projection (never for LoRA)."""
        return False

    def _train(self, batches: dict[int, dict[str, torch.Tensor]]) -> dict[int, float]:
        """One optimizer step of each trial in ``batches`` on its batch; {trial: its loss}."""
        self.base.train()
        return self.optim.step(self.base, batches, self._graphed if self.uses_graphs() else None,
                               autocast_bf16=self._autocast_bf16())  # fmt: skip

    def _graphed(self, trials: list[int], bounds: list[int], joined: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pack's forward and backward for the stacked trials' blocks as a CUDA graph
        (trainers/graph_step.py): the first call warms up, the second captures, later ones replay. The
        stacked adapters' addresses are baked into the graph, so a restack (a trial joins or leaves)
        captures anew."""
        from duetto.trainers.graph_step import GraphedStep

        key = (self.optim.version, tuple(trials), tuple(bounds))
        for stale in [k for k in self.graphs if k[0] != self.optim.version]:  # they captured adapters restacked since
            del self.graphs[stale]
        step = self.graphs.pop(key, None)
        if step is None:
            while len(self.graphs) >= GRAPHS_KEPT:
                self.graphs.pop(next(iter(self.graphs)))  # the least recently used
            if self._side is None:
                self._side = torch.cuda.Stream(device=self.device)
            pack_losses, optim = self.optim.losses, self.optim
            step = GraphedStep(self.base, autocast_bf16=self._autocast_bf16(), loss_fn=lambda batch: pack_losses(self.base, batch, len(trials)),
                               side_stream=self._side, params=stacked_tensors(self.layers),
                               after_backward=lambda: optim.clip(trials))  # fmt: skip
        self.graphs[key] = step
        replays = step.replays
        losses = step(joined)
        self._replayed = step.replays > replays  # read by step(): the trials' replayed steps
        return losses

    def eval_loss(self, t: int) -> float:
        """Trial t's eval_loss now, as the HF Trainer's evaluate computes it, with only its adapter."""
        with only_trial(self.base, self.layers, t), self._autocast():
            return evaluate_loss(self.base, self._eval_batches(t), self.device)

    def _eval_batches(self, t: int) -> Iterator[dict[str, torch.Tensor]]:
        """Trial t's eval-loss rows as the HF Trainer's evaluation batches them (on the CPU, in order)."""
        from duetto.trainers.trial_data import EncodedDataset, PaddingCollator

        cfg = self.trials[t].cfg
        dataset = EncodedDataset(self.trials[t].rows.loss(cfg), self.tokenizer, cfg.template, cfg.max_seq_len)
        collate, size = PaddingCollator(self.tokenizer.pad_token_id), self._eval_batch_size(cfg)
        for s in range(0, len(dataset), size):
            yield collate([dataset[i] for i in range(s, min(s + size, len(dataset)))])

    def eval_losses(self, ts: Sequence[int]) -> dict[int, float]:
        """``eval_loss`` of each trial of ``ts``. Trials that evaluate on the same rows with the same batch
        size share each evaluation batch: its rows once per trial, one block each, through their own
        adapters in one forward (the base runs once for all of them), and each block's mean token loss
        is that trial's loss of the batch, as its own forward computes it."""
        out: dict[int, float] = {}
        for batch_size, trials in self._eval_groups(ts):
            cfg = self.trials[trials[0]].cfg  # template and max_seq_len are the pack's (SHARED)
            per_pass = self._trials_per_eval_pass(len(trials), batch_size, cfg.max_seq_len)
            for group in (trials[i : i + per_pass] for i in range(0, len(trials), per_pass)):
                if len(group) == 1:
                    out[group[0]] = self.eval_loss(group[0])
                    continue
                totals, rows = torch.zeros(len(group), dtype=torch.float64), 0
                with torch.no_grad(), self._autocast(), by_rows(self.base, self.layers) as rows_of:
                    for batch in self._eval_batches(group[0]):  # the group's rows and batch size
                        n = batch["input_ids"].shape[0]
                        joined = {k: v.to(self.device).repeat(len(group), *([1] * (v.dim() - 1))) for k, v in batch.items()}
                        rows_of.owners = [t for t in group for _ in range(n)]
                        losses = PackedTrials.losses(self.base, joined, len(group))
                        totals += losses.double().cpu() * n  # one wait for the GPU per batch, not one a trial
                        rows += n
                out.update({t: float(totals[i]) / max(rows, 1) for i, t in enumerate(group)})
        return out

    def _eval_groups(self, ts: Sequence[int]) -> list[tuple[int, list[int]]]:
        """The trials of ``ts`` grouped by what their eval loss reads: the same rows at the same batch
        size; [(batch size, trials)]."""
        groups: dict[tuple, list[int]] = {}
        for t in ts:
            tr, cfg = self.trials[t], self.trials[t].cfg
            rows = tr.rows.loss(cfg)
            key = (self._eval_batch_size(cfg), hash(tuple((r["instruction"], r.get("input", ""), r["response"]) for r in rows)))
            groups.setdefault(key, []).append(t)
        return [(batch_size, trials) for (batch_size, _), trials in groups.items()]

    def _trials_per_eval_pass(self, trials: int, rows: int, length: int) -> int:
        """How many trials' blocks of ``rows`` rows one shared evaluation pass takes: on a GPU, while their
        logits (bf16, and a block's float copy for its loss) stay within a quarter of the free memory,
        which pack sizing (measured on training steps) does not hold back for evaluation."""
        if self.device.type != "cuda":
            return trials
        vocab = self.base.get_output_embeddings().weight.shape[0]
        per_trial = rows * length * vocab * (2 + 4)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(trials, int(free // 4 // per_trial)))

    def _eval_batch_size(self, cfg: TrialConfig) -> int:
        return max(cfg.batch_size, 32 if self.device.type == "cuda" else 8)

    def interim_report(self, t: int) -> dict[str, Any]:
        """What a trial alone reports at a report step (see interim_reports)."""
        return self.interim_reports([t])[t]

    def interim_reports(self, ts: Sequence[int]) -> dict[int, dict[str, Any]]:
        """What each trial alone reports at a report step: step, the last logged loss, eval_loss, its
        steps' speed so far and, on interim_eval_examples rows, BLEU/ROUGE. The trials' answers decode
        together, each row through its own trial's adapter: one decoding pass instead of one a trial."""
        from duetto.trainers.evaluate import text_metrics
        from duetto.trainers.trial_reports import peak_memory_bytes

        started = time.perf_counter()
        reports: dict[int, dict[str, Any]] = {}
        jobs: dict[int, list[dict]] = {}  # trial -> the rows its BLEU/ROUGE are computed on
        eval_losses = self.eval_losses(ts)
        for t in ts:
            tr, cfg = self.trials[t], self.trials[t].cfg
            report: dict[str, Any] = {"step": tr.step, "eval_split": tr.rows.split, "eval_loss": eval_losses[t],
                                      "peak_memory_bytes": self.peak_bytes or peak_memory_bytes(self.device)}  # fmt: skip
            if tr.losses:
                every = max(cfg.logging_steps, 1)
                report["train_loss"] = sum(tr.losses[-every:]) / len(tr.losses[-every:])
            if tr.step_seconds > 0:
                report["tokens_per_second"] = tr.trained_tokens / tr.step_seconds
            reports[t] = report
            rows = tr.rows.generation(cfg)[: cfg.interim_eval_examples] if cfg.interim_eval_examples > 0 else []
            if rows:
                jobs[t] = rows
        for t, answers in self._answers(list(jobs.items())).items():
            reports[t].update(text_metrics(answers, [r["response"] for r in jobs[t]]))
        seconds = time.perf_counter() - started
        for t in ts:
            self.trials[t].report_seconds += seconds
        return reports

    def _answers(self, jobs: Sequence[tuple[int, list[dict]]]) -> dict[int, list[str]]:
        """Greedy answers of each (trial, rows), as trial evaluation decodes them (the trials' template and
        max_seq_len, their eval batch size and max_new_tokens), the trials' rows in the same calls."""
        from duetto.data.prompts import encode_prompt
        from duetto.trainers.inference import generate_candidates, prompt_text

        groups: dict[tuple[int, int], list[tuple[int, list[dict]]]] = {}
        for t, rows in jobs:
            e = self.trials[t].cfg.eval
            groups.setdefault((e.max_new_tokens, e.batch_size), []).append((t, rows))
        out: dict[int, list[str]] = {}
        for (max_new, batch), group in groups.items():
            cfg = self.trials[group[0][0]].cfg  # template and max_seq_len are the pack's (SHARED)
            prompts = {t: [prompt_text(self.tokenizer, cfg.template, r["instruction"], r.get("input", "")) for r in rows]
                       for t, rows in group}  # fmt: skip
            with self._decoding_weights(), by_rows(self.base, self.layers) as rows_of:
                longest = max((len(encode_prompt(p, self.tokenizer, cfg.max_seq_len)) for ps in prompts.values() for p in ps),
                              default=0)  # fmt: skip
                total = batch or self._default_decode_rows(len(group), longest + max_new)
                answers: dict[int, list[str]] = {t: [] for t, _ in group}
                for call in decode_calls([(t, len(rows)) for t, rows in group], total):
                    rows_of.owners = [t for t, start, stop in call for _ in range(start, stop)]
                    cands = iter(generate_candidates(self.base, self.tokenizer, [p for t, start, stop in call for p in prompts[t][start:stop]],
                                                     1, max_new_tokens=max_new, temperature=0.0, max_prompt_tokens=cfg.max_seq_len,
                                                     logprobs=False))  # fmt: skip
                    for t, start, stop in call:
                        answers[t] += [next(cands)[0].text for _ in range(start, stop)]
            out.update(answers)
        return out

    def _default_decode_rows(self, trials: int, length: int) -> int:
        """The rows of a shared decoding call when ``eval.batch_size`` is 0: as many of each trial's as a
        trial alone decodes in one call (256 on a GPU, 16 elsewhere), fewer where the GPU memory free or
        cached would not hold them, never fewer than a trial alone takes."""
        alone = 256 if self.device.type == "cuda" else 16
        return max(alone, min(alone * trials, self._decode_rows_that_fit(length)))

    def _decode_rows_that_fit(self, length: int) -> int:
        """How many rows of ``length`` tokens (prompt and answer) one decoding call may take: on a GPU,
        while their KV cache, one layer's prefill activations and attention scores and a step's float
        logits stay within a quarter of the memory free or cached (the decoding weights already in
        place); no limit elsewhere."""
        if self.device.type != "cuda":
            return 1 << 30
        c = self.base.config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        kv = c.num_hidden_layers * 2 * kv_heads * head_dim * length * 2
        prefill = length * (3 * (getattr(c, "intermediate_size", None) or 4 * c.hidden_size) + 4 * c.hidden_size) * 2
        scores = c.num_attention_heads * length * length * 4  # the math attention kernel's, where it runs
        per_row = kv + prefill + scores + c.vocab_size * 4 * 2
        return max(1, int(free_gpu_bytes(self.device) // 4 // per_row))

    def _decoding_weights(self):
        """What the answers decode on: on a GPU, the shared base dequantized to plain layers for the
        decoding pass (while they fit, as a trial's final decoding does: trainers/trial.py
        decode_on_dequantized_base), so no decoding step dequantizes in every layer; else the
        quantized base itself. The trials' adapters are the same either way."""
        from contextlib import nullcontext

        from duetto.models import dequantized_bnb_layers, dequantized_bytes, dequantized_fits
        from duetto.trainers.trial import resolve_dtype

        if self.device.type != "cuda" or not self.trials:
            return nullcontext()
        dtype = resolve_dtype(next(iter(self.trials.values())).cfg.precision, True)[0]
        if not dequantized_fits(dequantized_bytes(self.base, dtype), self.device):
            return nullcontext()
        return dequantized_bnb_layers(self.base, dtype)

    def finish(self, t: int) -> dict[str, Any]:
        """Evaluate trial t with only its adapter, save it into its output_dir, and drop it."""
        return self.finish_all([t])[t]

    def finish_all(self, ts: Sequence[int]) -> dict[int, dict[str, Any]]:
        """``finish`` for each trial of ``ts``: each one's eval loss with only its adapter, and their
        BLEU/ROUGE answers in shared decoding passes (each row through its own trial's adapter, as
        the interim reports decode), then each one saved and dropped; {trial: its metrics}."""
        from duetto.trainers.evaluate import text_metrics
        from duetto.trainers.trial import write_outputs
        from duetto.trainers.trial_reports import peak_memory_bytes

        train_peak = self.peak_bytes or peak_memory_bytes(self.device)
        if self.memory is not None:
            self.memory.reset_peak()  # the evaluations' own peak, below
        t0 = time.perf_counter()
        eval_losses = self.eval_losses(ts)
        eval_seconds = dict.fromkeys(ts, time.perf_counter() - t0)  # each counts the shared passes whole
        t0 = time.perf_counter()
        gen_rows = {t: self.trials[t].rows.generation(self.trials[t].cfg) for t in ts}
        answers = self._answers([(t, rows) for t, rows in gen_rows.items() if rows])
        decoding = time.perf_counter() - t0  # every trial's answers: each counts the whole decoding
        gens, gen_seconds = {}, {}
        for t in ts:
            t0 = time.perf_counter()
            gens[t] = text_metrics(answers.get(t, []), [r["response"] for r in gen_rows[t]])
            gen_seconds[t] = decoding + time.perf_counter() - t0
        out: dict[int, dict[str, Any]] = {}
        for t in ts:
            tr, cfg = self.trials[t], self.trials[t].cfg
            predictions, gen = answers.get(t, []), gens[t]
            wall = time.perf_counter() - tr.joined_at
            phases = {"setup": tr.setup_seconds, "train": tr.step_wall, "interim_reports": tr.report_seconds,
                      "eval_loss": eval_seconds[t], "generation": gen_seconds[t]}  # fmt: skip
            # attached but in none of its own phases: other trials' steps, joins, evaluations and saves,
            # or its wait at a report for its Tune client to move it on (disjoint spans: never below 0)
            phases["waiting"] = wall - sum(phases.values())
            every = max(cfg.logging_steps, 1)
            # as the HF Trainer logs it: the mean loss of each full window of logging_steps
            curve = [[s + every, sum(tr.losses[s : s + every]) / every] for s in range(0, len(tr.losses) - every + 1, every)]
            metrics = {
                "method": cfg.method, "train_loss": sum(tr.losses) / max(len(tr.losses), 1), "eval_loss": eval_losses[t],
                "bleu4": gen["bleu4"], "rougeL": gen["rougeL"], "peak_memory_bytes": train_peak,
                "eval_peak_memory_bytes": peak_memory_bytes(self.device),
                "tokens_per_second": tr.trained_tokens / tr.step_seconds if tr.step_seconds > 0 else 0.0,
                "trained_tokens": tr.trained_tokens, "train_seconds": tr.step_seconds,
                "train_wall_seconds": tr.step_seconds, "wall_seconds": wall, "phase_seconds": phases,
                "trainable_params": tr.trainable_params, "total_params": self._total_params(t),
                "num_train_examples": len(tr.dataset), "num_eval_examples": len(gen_rows[t]), "eval_split": tr.rows.split,
                "truncated_train_examples": tr.dataset.truncated, "step": tr.step, "train_loss_curve": curve,
                "fast_path": self._fast_path(tr), "resumed_from_step": tr.resumed_from,
                "refresh_step_seconds": tr.refresh_wall,
                "world_size": 1, "device": str(self.device), "done": True,
            }  # fmt: skip
            model_dir = self._save(t)
            write_outputs(cfg, self.model_path, model_dir, gen_rows[t], predictions, metrics)
            out[t] = metrics
        for t in ts:
            self.leave(t)
        return out

    def _total_params(self, t: int) -> int:
        own = self.trials[t].trainable_params
        return sum(p.numel() for n, p in self.base.named_parameters() if ".lora_" not in n) + own

    def _save(self, t: int) -> Any:
        """Trial t's output_dir/model (a PEFT adapter folder); returns that folder."""
        return save_adapter(self.layers, t, self.trials[t].cfg, self.model_path, self.tokenizer)

    def uses_graphs(self) -> bool:
        """The pack's forward and backward replay as CUDA graphs: on CUDA, unless its trials say
        cuda_graphs: false or its base cannot be captured (graph_blocker)."""
        first = next(iter(self.trials.values()), None)
        return (self.device.type == "cuda" and self.graph_blocker is None
                and (first is None or first.cfg.cuda_graphs is not False))  # fmt: skip

    def _fast_path(self, tr: PackedTrial) -> str:
        """metrics.json's ``fast_path`` of a packed trial: the pack, and its steps replayed as a CUDA graph."""
        packed = f"packed: {len(self.trials)} trials on one base when it left"
        if not self.uses_graphs():
            return packed if self.graph_blocker is None else f"{packed}; eager steps ({self.graph_blocker})"
        return f"{packed}; {tr.replayed} of {tr.step - tr.resumed_from} steps replayed as a CUDA graph"

    def leave(self, t: int) -> None:
        if self.trials.pop(t, None) is None:
            return
        for key in [key for key in self.graphs if t in key[1]]:  # its weights are about to go
            del self.graphs[key]
        if self.optim is not None:
            self.optim.remove(t)
        for layer in self.layers.values():  # its adapter's memory goes back to the pack
            layer.drop_adapter(t)


def new_pack(method: str, device: torch.device, **kwargs: Any) -> Pack:
    """An empty pack for trials of ``method``: a QLoRA ``Pack`` or a GaLore ``GaloreStack``."""
    if method == "galore":
        from duetto.trainers.stacked_galore import GaloreStack

        return GaloreStack(device, **kwargs)
    return Pack(device, **kwargs)


def train_packed(cfgs: Sequence[TrialConfig], device: torch.device) -> list[dict[str, Any]]:
    """Train every config for its own number of steps, then evaluate and save each one into its
    output_dir (model/: a PEFT adapter or a full model; metrics.json); returns each trial's metrics."""
    check_packable(cfgs)
    pack = new_pack(cfgs[0].method, device)
    ids = [pack.join(cfg) for cfg in cfgs]
    while pack.step():
        pass
    done = pack.finish_all(ids)
    return [done[t] for t in ids]


def decode_calls(sizes: Sequence[tuple[int, int]], total: int) -> list[list[tuple[int, int, int]]]:
    """The shared decoding calls for trials with ``sizes`` [(trial, rows)], at most ``total`` rows a call:
    each call a list of (trial, first row, end row) blocks. Trials with as many rows each share every
    call in equal blocks (which run through the stacked adapters) when a call holds a row of each;
    otherwise their rows fill the calls one trial after another."""
    counts = {n for _, n in sizes}
    if len(counts) == 1 and total >= len(sizes):
        n = counts.pop()
        each = max(1, total // len(sizes))
        return [[(t, start, min(start + each, n)) for t, _ in sizes] for start in range(0, n, each)]
    calls: list[list[tuple[int, int, int]]] = [[]]
    room = total
    for t, n in sizes:
        start = 0
        while start < n:
            if room == 0:
                calls.append([])
                room = total
            stop = min(n, start + room)
            calls[-1].append((t, start, stop))
            room -= stop - start
            start = stop
    return [call for call in calls if call]


class by_rows:
    """Inside, ``base`` runs each row of a batch through the adapter of its trial, ``owners[row]`` (set
    before each call; a trial's rows next to each other), in eval mode."""

    def __init__(self, base: Any, layers: dict):
        self.base, self.layers = base, layers
        self.owners: list[int] = []

    def runs(self, rows: int) -> list[tuple[int, int, int]]:
        """(trial, first row, end row) of each trial's block of a batch of ``rows`` rows."""
        if rows != len(self.owners):
            raise RuntimeError(f"by_rows: a batch of {rows} rows for {len(self.owners)} owners")
        runs, start = [], 0
        for t, block in itertools.groupby(self.owners):
            n = len(list(block))
            runs.append((t, start, start + n))
            start += n
        return runs

    def __enter__(self) -> by_rows:
        from duetto.trainers.packed_lora import set_slices

        def mark(module, args, kwargs):
            ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
            set_slices(self.layers, self.runs(ids.shape[0]))

        self.hook = self.base.register_forward_pre_hook(mark, with_kwargs=True)
        self.was_training = self.base.training
        self.base.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hook.remove()
        self.base.train(self.was_training)


class only_trial(by_rows):
    """Inside, ``base`` runs every batch through trial ``t``'s adapter alone, in eval mode: what
    evaluation and generation of that trial need."""

    def __init__(self, base: Any, layers: dict, t: int):
        super().__init__(base, layers)
        self.t = t

    def runs(self, rows: int) -> list[tuple[int, int, int]]:
        return [(self.t, 0, rows)]


def free_gpu_bytes(device: torch.device) -> int:
    """GPU memory a new allocation can take: the device's free memory and what PyTorch's caching
    allocator holds but no tensor uses."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def evaluate_loss(model: Any, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> float:
    """The HF Trainer's eval_loss: each batch's mean token loss, averaged with the batch's rows as weights."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            n = batch["input_ids"].shape[0]
            total, rows = total + float(loss) * n, rows + n
    return total / max(rows, 1)


def save_adapter(layers: dict, t: int, cfg: TrialConfig, base_path: str, tokenizer: Any) -> Any:
    """output_dir/model as PEFT saves an adapter (adapter_config.json, adapter_model.safetensors with
    PEFT's key names) with the tokenizer beside it; returns that folder."""
    from pathlib import Path

    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(cfg.output_dir) / "model"
    out.mkdir(parents=True, exist_ok=True)
    q = cfg.qlora
    LoraConfig(r=q.r, lora_alpha=q.alpha, lora_dropout=q.dropout, target_modules=list(q.target_modules),
               task_type="CAUSAL_LM", base_model_name_or_path=base_path).save_pretrained(str(out))  # fmt: skip
    state = {k: v.contiguous().cpu() for k, v in peft_adapter_state(layers, t).items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    return out
