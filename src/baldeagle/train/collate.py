"""Batching: right-pad prepared rows to the longest row in the batch.

Rows of similar length are grouped by the sampler (`train_sampling_strategy="group_by_length"`
over the `length` column), so padding wastes little compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


def add_length_column(dataset):
    """The length-grouped sampler reads row lengths from a `length` column instead of re-scanning."""
    if "length" in dataset.column_names:
        return dataset
    return dataset.map(lambda row: {"length": len(row["input_ids"])}, desc="lengths")


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Transformers' length-grouped order, drawn from a generator seeded by (seed, epoch) instead
    of the global RNG: a resumed run, which skips the batches already trained, replays the same
    order in any epoch, and every process draws the same one."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) each epoch
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


@dataclass
class PadCollator:
    pad_token_id: int
    max_length: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        index = torch.tensor([row.get("row_index", -1) for row in rows], dtype=torch.long)
        rows = [
            {"input_ids": list(row["input_ids"])[: self.max_length], "loss_mask": list(row["loss_mask"])[: self.max_length]}
            for row in rows
        ]
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            loss_mask[i, :n] = torch.tensor(row["loss_mask"], dtype=torch.long)
        # shape: [B, T] each; padding is never trained (loss_mask 0) and never attended (mask 0).
        # row_index [B]: the prepared-data row each line came from (the offline store is keyed by it).
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "row_index": index}
