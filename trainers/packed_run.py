"""Train several QLoRA trial configs together, each as `duetto train` would train it alone.

Each trial keeps what makes it itself: its LoRA init (the trial's own method build under its seed),
its data order (the HF Trainer's: a permutation of the train rows per epoch, seeded with data_seed +
epoch), its AdamW, learning-rate schedule and gradient clip. What the trials share is the frozen,
quantized base, which every step runs once over all trials' rows (trainers/packed_lora.py).

After training, each trial is evaluated (eval loss, BLEU/ROUGE of greedy answers) through the packed
model with only its own adapter active, and saved as a PEFT adapter folder.

Work in progress: not yet wired into `duetto sweep` (no Ray Tune reporting, checkpoints or ASHA).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from duetto.trainers.config import TrialConfig
from duetto.trainers.packed_lora import LoraSpec, PackedTrials, TrialOptim, load_peft_adapter, pack_lora

#: Settings every trial of a pack must share: they shape the shared base and the packed batch.
SHARED = ("method", "model", "template", "max_seq_len", "batch_size", "precision", "gradient_checkpointing",
          "qlora.bits", "qlora.target_modules", "qlora.upcast_fp32", "gradient_accumulation_steps")  # fmt: skip


def check_packable(cfgs: Sequence[TrialConfig]) -> None:
    from duetto.config import ConfigError, flatten, to_dict

    flat = [flatten(to_dict(c)) for c in cfgs]
    for key in SHARED:
        values = {str(f.get(key)) for f in flat}
        if len(values) > 1:
            raise ConfigError(f"{key}: trials packed together must share it, got {sorted(values)}")
    if cfgs[0].method != "qlora":
        raise ConfigError(f"method: only qlora trials pack on one base, got {cfgs[0].method}")
    if cfgs[0].gradient_accumulation_steps != 1:
        raise ConfigError("gradient_accumulation_steps: packed trials step every batch (1)")
    if list(cfgs[0].qlora.target_modules) == ["all-linear"]:
        raise ConfigError("qlora.target_modules: name the modules to pack (all-linear is not supported yet)")


def hf_order(n: int, data_seed: int) -> Iterator[int]:
    """The HF Trainer's training order (accelerate's SeedableRandomSampler): epoch e is
    ``randperm(n)`` of a generator seeded with data_seed + e."""
    epoch = 0
    while True:
        yield from torch.randperm(n, generator=torch.Generator().manual_seed(data_seed + epoch)).tolist()
        epoch += 1


def total_steps(cfg: TrialConfig, n_rows: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else math.ceil(n_rows / cfg.batch_size) * int(math.ceil(cfg.epochs))


def train_packed(cfgs: Sequence[TrialConfig], device: torch.device) -> list[dict[str, Any]]:
    """Train every config for its own number of steps, then evaluate and save each one into its
    output_dir (model/: a PEFT adapter; metrics.json); returns each trial's metrics."""
    from peft import get_peft_model_state_dict
    from transformers import set_seed

    from duetto.models import load_tokenizer, resolve_model
    from duetto.trainers.methods import get_method
    from duetto.trainers.trial import resolve_dtype
    from duetto.trainers.trial_data import EncodedDataset, PaddingCollator, load_rows

    check_packable(cfgs)
    first = cfgs[0]
    model_path = resolve_model(first.model)
    tokenizer = load_tokenizer(model_path)
    dtype, _ = resolve_dtype(first.precision, device.type == "cuda")
    inits: list[dict[str, torch.Tensor]] = []
    datasets, row_sets = [], []
    base: Any = None
    for cfg in cfgs:
        set_seed(cfg.seed)  # as the trial's _setup: the seed, then rows and the method's build (LoRA init)
        rows = load_rows(cfg)
        row_sets.append(rows)
        datasets.append(EncodedDataset(rows.train, tokenizer, cfg.template, cfg.max_seq_len))
        built = get_method("qlora").build(cfg, model_path, dtype, device)
        inits.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(built.model).items()})
        if base is None:
            base = built.model.unload()  # the prepared, quantized base without LoRA layers
        del built
    specs = [LoraSpec(r=c.qlora.r, alpha=c.qlora.alpha, dropout=c.qlora.dropout) for c in cfgs]
    layers = pack_lora(base, first.qlora.target_modules, specs)
    for t, init in enumerate(inits):
        load_peft_adapter(layers, t, init)
    steps = [total_steps(c, len(ds)) for c, ds in zip(cfgs, datasets)]
    optims = []
    for cfg, n in zip(cfgs, steps):
        warmup = cfg.warmup_ratio if cfg.warmup_ratio >= 1 else math.ceil(n * cfg.warmup_ratio)
        optims.append(TrialOptim(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=1.0,
                                 warmup_steps=int(warmup), total_steps=n, scheduler=cfg.lr_scheduler))  # fmt: skip
    trials = PackedTrials(layers, optims)
    orders = [hf_order(len(ds), c.seed) for c, ds in zip(cfgs, datasets)]
    collate = PaddingCollator(tokenizer.pad_token_id, width=first.max_seq_len)  # one width: the trials' rows stack
    losses: list[list[float]] = [[] for _ in cfgs]
    base.train()
    for step in range(max(steps)):
        batches = {}
        for t in range(len(cfgs)):
            if step < steps[t]:  # a trial that has run its steps leaves the pack
                idx = [next(orders[t]) for _ in range(cfgs[t].batch_size)]
                batches[t] = {k: v.to(device) for k, v in collate([datasets[t][i] for i in idx]).items()}
        for t, loss in trials.step(base, batches).items():
            losses[t].append(loss)
    results = []
    for t, cfg in enumerate(cfgs):
        eval_ds = EncodedDataset(row_sets[t].loss(cfg), tokenizer, cfg.template, cfg.max_seq_len)
        with only_trial(base, layers, t):
            eval_loss = evaluate_loss(base, eval_ds, PaddingCollator(tokenizer.pad_token_id),
                                      max(cfg.batch_size, 32 if device.type == "cuda" else 8), device)  # fmt: skip
            from duetto.trainers.trial_reports import generation_metrics

            gen, predictions = generation_metrics(base, tokenizer, row_sets[t].generation(cfg), cfg)
        metrics = {"method": cfg.method, "eval_loss": eval_loss, "bleu4": gen["bleu4"], "rougeL": gen["rougeL"],
                   "step": steps[t], "train_loss_curve": [[i + 1, x] for i, x in enumerate(losses[t])],
                   "train_loss": sum(losses[t]) / len(losses[t]), "packed_with": len(cfgs) - 1}  # fmt: skip
        save_adapter(layers, t, cfg, model_path, tokenizer, metrics)
        results.append(metrics)
    return results


class only_trial:
    """Inside, ``base`` runs every batch through trial ``t``'s adapter alone (a forward pre-hook marks
    all rows as its rows), in eval mode: what evaluation and generation of that trial need."""

    def __init__(self, base: Any, layers: dict, t: int):
        self.base, self.layers, self.t = base, layers, t

    def __enter__(self) -> None:
        from duetto.trainers.packed_lora import set_slices

        def mark(module, args, kwargs):
            ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
            set_slices(self.layers, [(self.t, 0, ids.shape[0])])

        self.hook = self.base.register_forward_pre_hook(mark, with_kwargs=True)
        self.was_training = self.base.training
        self.base.eval()

    def __exit__(self, *exc: Any) -> None:
        self.hook.remove()
        self.base.train(self.was_training)


def evaluate_loss(model: Any, dataset: Any, collate: Any, batch_size: int, device: torch.device) -> float:
    """The HF Trainer's eval_loss: each batch's mean token loss, averaged with the batch's rows as weights."""
    total, rows = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(dataset), batch_size):
            batch = {k: v.to(device) for k, v in collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]).items()}
            loss = model(**batch).loss
            n = batch["input_ids"].shape[0]
            total, rows = total + float(loss) * n, rows + n
    return total / max(rows, 1)


def save_adapter(layers: dict, t: int, cfg: TrialConfig, base_path: str, tokenizer: Any, metrics: dict) -> None:
    """output_dir/model as PEFT saves an adapter (adapter_config.json, adapter_model.safetensors with
    PEFT's key names), the tokenizer beside it, and metrics.json."""
    import json
    from pathlib import Path

    from peft import LoraConfig
    from safetensors.torch import save_file

    from duetto.trainers.packed_lora import peft_adapter_state

    out = Path(cfg.output_dir) / "model"
    out.mkdir(parents=True, exist_ok=True)
    q = cfg.qlora
    LoraConfig(r=q.r, lora_alpha=q.alpha, lora_dropout=q.dropout, target_modules=list(q.target_modules),
               task_type="CAUSAL_LM", base_model_name_or_path=base_path).save_pretrained(str(out))  # fmt: skip
    state = {k: v.contiguous().cpu() for k, v in peft_adapter_state(layers, t).items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    metrics["model_dir"] = str(out.resolve())
    (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
