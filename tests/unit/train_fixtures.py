"""A tiny target saved as a local model folder and a prepared dataset for it, for training tests."""

from __future__ import annotations

import json

import numpy as np
from datasets import Dataset

from tiny_targets import tiny_target


def save_tiny_target(folder, name: str = "llama", **overrides):
    # A wide init makes the random target's next-token distributions peaked (entropy ~3 nats
    # instead of ~5.5), so a draft has something to learn within a few dozen steps.
    model = tiny_target(name, **{"initializer_range": 0.4, **overrides})
    model.save_pretrained(folder)
    return folder


def save_prepared(folder, rows: int = 24, length: int = 48, vocab: int = 256, seed: int = 0,
                  trained: bool = True):
    """Rows of a repeating token pattern (learnable), assistant-style mask on the second half."""
    rng = np.random.default_rng(seed)
    input_ids, loss_mask = [], []
    for r in range(rows):
        n = length - (r % 4) * 4  # a few different lengths, as real data has
        period = rng.integers(3, 7)
        base = rng.integers(3, vocab, size=period)
        ids = np.resize(base, n).tolist()
        mask = [0] * (n // 2) + [1 if trained else 0] * (n - n // 2)
        input_ids.append(ids)
        loss_mask.append(mask)
    Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_mask}).save_to_disk(str(folder))
    stats = {"rows_in": rows, "rows_kept": rows, "tokens": sum(map(len, input_ids)),
             "trained_tokens": sum(map(sum, loss_mask)), "skipped": {}}
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder
