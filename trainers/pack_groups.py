"""Which trials may share a pack: the settings they must have in common, by method, and the key that
groups them. Torch-free, so that a sweep's thin packed-trial clients (tune/packing.py) find their
pack without importing torch."""

from __future__ import annotations

from collections.abc import Sequence

from duetto.trainers.config import TrialConfig

#: Settings every trial of a pack must share, by method: they shape the packed batch and, for QLoRA,
#: the shared base. GaLore trials share no weights, so their optimizer settings may differ.
SHARED = {
    "qlora": ("method", "model", "template", "max_seq_len", "batch_size", "precision", "gradient_checkpointing",
              "qlora.bits", "qlora.target_modules", "qlora.upcast_fp32", "gradient_accumulation_steps",
              "cuda_graphs"),
    "galore": ("method", "model", "template", "max_seq_len", "batch_size", "precision", "gradient_accumulation_steps",
               "cuda_graphs"),
}  # fmt: skip
#: The methods whose trials pack (trainers/stacked_galore.py packs GaLore trials)
PACKABLE = tuple(SHARED)


def shared_settings(cfg: TrialConfig) -> dict[str, str]:
    from duetto.config import flatten, to_dict

    flat = flatten(to_dict(cfg))
    return {key: str(flat.get(key)) for key in SHARED.get(cfg.method, SHARED["qlora"])}


def group_key(cfg: TrialConfig) -> str:
    """Trials with the same key can share a pack (the SHARED settings, hashed)."""
    import hashlib

    return hashlib.sha1(repr(list(shared_settings(cfg).values())).encode()).hexdigest()[:10]


def unpackable(cfg: TrialConfig) -> str:
    """Why a trial cannot train in a pack, naming the setting ("" when it can)."""
    if cfg.method not in PACKABLE:
        return f"method: {cfg.method} trials do not pack"
    if cfg.gradient_accumulation_steps != 1:
        return "gradient_accumulation_steps: packed trials step every batch (1)"
    if cfg.method == "qlora" and list(cfg.qlora.target_modules) == ["all-linear"]:
        return "qlora.target_modules: name the modules to pack (all-linear is not supported yet)"
    return ""


def check_packable(cfgs: Sequence[TrialConfig]) -> None:
    from duetto.config import ConfigError

    methods = sorted({c.method for c in cfgs})
    if len(methods) > 1 or methods[0] not in PACKABLE:
        raise ConfigError(f"method: trials packed together are all qlora or all galore, got {', '.join(methods)}")
    settings = [shared_settings(c) for c in cfgs]
    for key in SHARED[methods[0]]:
        values = {s[key] for s in settings}
        if len(values) > 1:
            raise ConfigError(f"{key}: trials packed together must share it, got {sorted(values)}")
    why = unpackable(cfgs[0])  # the shared settings hold what it reads: one trial answers for all
    if why:
        raise ConfigError(why)
