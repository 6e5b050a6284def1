"""A trial's data: unified rows tokenized once with label masks, padded per batch, and the
validation split held out of the training file.
"""

from __future__ import annotations

from duetto.config import ConfigError


class EncodedDataset:
    """Tokenized unified rows (lists), padded per batch by the collator."""

    def __init__(self, rows: list[dict], tokenizer, template: str, max_seq_len: int):
        from duetto.data.prompts import encode_example

        self.items = []
        self.truncated = 0
        for row in rows:
            enc = encode_example(row, tokenizer, template=template, max_seq_len=max_seq_len)
            self.truncated += bool(enc.get("truncated"))
            self.items.append({k: enc[k] for k in ("input_ids", "attention_mask", "labels")})

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


def read_rows(path: str, limit: int = 0) -> list[dict]:
    from duetto.data.unify import read_jsonl

    rows = read_jsonl(path)
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

