"""A trial's data: unified rows tokenized once with label masks, padded per batch, and the
validation split held out of the training file.
"""

from __future__ import annotations

from dataclasses import dataclass

from duetto.config import ConfigError
from duetto.trainers.config import TrialConfig


class EncodedDataset:
    """Tokenized unified rows (lists), padded per batch by the collator."""

    def __init__(self, rows: list[dict], tokenizer, template: str, max_seq_len: int):
        from duetto.data.prompts import encode_examples

        encoded = encode_examples(rows, tokenizer, template=template, max_seq_len=max_seq_len)
        self.truncated = sum(bool(enc.get("truncated")) for enc in encoded)
        self.items = [{k: enc[k] for k in ("input_ids", "attention_mask", "labels")} for enc in encoded]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PaddingCollator:
    """Pads a batch (labels -100 on padding, by attention mask).

    ``width`` pads every batch to one fixed length: compiled models then see one shape instead of
    recompiling for every new longest example (measured on the H200: ~60 s per step otherwise).
    Trained tokens are counted by the Trainer (``include_num_input_tokens_seen``), not here: the
    Trainer collates its evaluation batches with this same collator."""

    def __init__(self, pad_id: int, width: int = 0):
        self.pad_id = pad_id
        self.width = width

    def __call__(self, features: list[dict]) -> dict:
        from duetto.data.prompts import pad_batch

        return pad_batch(features, self.pad_id, side="right", width=self.width)


@dataclass
class TrialRows:
    """The rows one trial trains and evaluates on."""

    train: list[dict]
    held_out: list[dict]  # the validation split (data.val_size) or the test split: all evaluation uses it
    split: str  # "validation" or "test"

    def generation(self, cfg: TrialConfig) -> list[dict]:
        n = cfg.eval.num_examples
        return self.held_out[:n] if n > 0 else self.held_out

    def loss(self, cfg: TrialConfig) -> list[dict]:
        n = cfg.eval.loss_examples
        return self.held_out[:n] if n > 0 else self.held_out


def load_rows(cfg: TrialConfig) -> TrialRows:
    """Read and check a trial's data: each file readable and unified, rows to train on (unless the trial
    trains nothing) and at least one to evaluate on; else ConfigError naming the key and the file.
    The driver calls this before any Ray worker starts (a bad file fails in a second); workers again."""
    train = read_rows(cfg.data.train, cfg.data.limit_train, key="data.train")
    if cfg.data.val_size:
        train, held_out = split_validation(train, cfg.data.val_size, cfg.data.train)
        split, held_key, held_path = "validation", "data.val_size", cfg.data.train
    else:
        held_out = read_rows(cfg.data.test, key="data.test")
        split, held_key, held_path = "test", "data.test", cfg.data.test
    if not train and cfg.max_steps != 0:
        raise ConfigError(f"data.train: {cfg.data.train} has no rows to train on")
    if not held_out:
        raise ConfigError(f"{held_key}: {held_path} leaves no {split} rows; evaluation needs at least one")
    return TrialRows(train, held_out, split)


def read_rows(path: str, limit: int = 0, *, key: str = "data") -> list[dict]:
    """The rows of a unified JSONL file (the first ``limit``, when > 0); a missing, unreadable or
    malformed file raises ConfigError ``KEY: FILE[:LINE]: why``."""
    from duetto.data.sources import DataError
    from duetto.data.unify import read_jsonl

    try:
        rows = read_jsonl(path)
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{key}: {path}: {e.strerror or e}") from None
    return rows[:limit] if limit and limit > 0 else rows


def split_validation(train_rows: list[dict], val_size: float, source: str) -> tuple[list[dict], list[dict]]:
    """(train, validation): the last ``val_size`` rows (a fraction < 1, or a count) are held out.
    `duetto data prepare` has already shuffled the file with its seed, so the tail is a random sample,
    and every trial of a sweep holds out the same rows."""
    n = round(val_size * len(train_rows)) if val_size < 1 else int(val_size)
    if n < 1 or n >= len(train_rows):
        raise ConfigError(f"data.val_size={val_size:g}: {source} has {len(train_rows)} training rows, "
                          f"which leaves {len(train_rows) - n} to train on and {n} to validate on")  # fmt: skip
    return train_rows[:-n], train_rows[-n:]

