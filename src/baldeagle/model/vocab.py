"""Draft vocabulary for EAGLE-3: token frequencies → `d2t` / `t2d`.

The draft predicts over the N most frequent *trained* tokens (loss_mask == 1), sorted by id:

    used    = sorted ids of the N most frequent tokens (ties: the lower id first)
    d2t[i]  = used[i] - i          # an offset, not an id: engines compute draft_id + d2t[draft_id]
    t2d[j]  = j in used            # bool over the target vocabulary

If fewer than N tokens ever appear, the rest is filled with the lowest unused ids (the same rule:
never-seen tokens all tie at count 0, and ties go to the lower id).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def build_draft_vocab(
    token_counts: torch.Tensor, draft_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token_counts [V] → (d2t int64 [N], t2d bool [V], used_ids int64 [N]), N = min(draft_vocab_size, V)."""
    counts = torch.as_tensor(token_counts).flatten().to(torch.long)
    size = min(int(draft_vocab_size), counts.numel())
    if size <= 0:
        raise ValueError(f"draft_vocab_size must be positive, got {draft_vocab_size}")
    order = torch.sort(-counts, stable=True).indices  # most frequent first; equal counts keep id order
    used = order[:size].sort().values  # [N], sorted by id
    d2t = used - torch.arange(size)
    t2d = torch.zeros(counts.numel(), dtype=torch.bool)
    t2d[used] = True
    return d2t, t2d, used


def used_ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    """d2t [N] → the target ids of the draft vocabulary [N]."""
    return torch.arange(d2t.numel(), device=d2t.device) + d2t


def target_to_draft_ids(target_ids: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
    """Target ids [...] → draft ids [...], -1 where the token is not in the draft vocabulary."""
    draft_index = torch.cumsum(t2d.long(), dim=0) - 1  # [V]: the draft id of each in-vocab token
    return torch.where(t2d[target_ids], draft_index[target_ids], torch.full_like(target_ids, -1))


def _batches(rows, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, loss_mask) as flat numpy arrays, a batch of rows at a time."""
    if hasattr(rows, "with_format") and hasattr(rows, "iter"):  # a datasets.Dataset: read Arrow directly
        import pyarrow.compute as pc

        for table in rows.select_columns(["input_ids", "loss_mask"]).with_format("arrow").iter(batch_size):
            ids = pc.list_flatten(table.column("input_ids")).to_numpy(zero_copy_only=False)
            mask = pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False)
            yield ids, mask
        return
    chunk_ids, chunk_mask = [], []
    for row in rows:
        chunk_ids.append(np.asarray(row["input_ids"], dtype=np.int64))
        chunk_mask.append(np.asarray(row["loss_mask"], dtype=np.int64))
        if len(chunk_ids) == batch_size:
            yield np.concatenate(chunk_ids), np.concatenate(chunk_mask)
            chunk_ids, chunk_mask = [], []
    if chunk_ids:
        yield np.concatenate(chunk_ids), np.concatenate(chunk_mask)


def count_trained_tokens(dataset_rows, vocab_size: int, batch_size: int = 1024) -> torch.Tensor:
    """How often each token id is trained on (loss_mask == 1) → int64 [vocab_size].

    `dataset_rows`: a `datasets.Dataset` with columns input_ids and loss_mask (read as Arrow, a
    batch at a time), or any iterable of dicts with those keys.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids, mask in _batches(dataset_rows, batch_size):
        if ids.shape != mask.shape:
            raise ValueError(f"input_ids and loss_mask differ in length ({ids.shape[0]} vs {mask.shape[0]} tokens)")
        trained = ids[mask.astype(bool)].astype(np.int64)
        if trained.size and (trained.min() < 0 or trained.max() >= vocab_size):
            raise ValueError(f"token id {int(trained.max())} is outside the vocabulary of {vocab_size}")
        counts += np.bincount(trained, minlength=vocab_size)
    return torch.from_numpy(counts)
