"""Target features for training, computed online: the frozen target runs on each batch.

A draft learns from two things the target computes per position t:
- its features: EAGLE-1 uses the last hidden state after the final norm (`hidden_states[-1]`,
  the LM head's input); EAGLE-3 the hidden states entering the aux layers (`hidden_states[i]`,
  concatenated to 3H);
- its next-token distribution, as logits (the training targets).
The offline feature store (`baldeagle features`) holds the same tensors on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


class TargetLogits:
    """The target's next-token logits, computed only where they are indexed.

    Training needs them at trained positions only (often a third of a chat row), and the LM head
    is a large share of a small target's forward, so `logits[b_idx, p_idx]` runs the head on just
    those rows: shape [N, V]. Indexing works like a [B, T, V] tensor's first two dimensions.
    """

    def __init__(self, last_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.last_hidden, self.weight, self.bias = last_hidden, weight, bias  # [B, T, H], [V, H], [V]

    @torch.no_grad()
    def __getitem__(self, index) -> torch.Tensor:
        hidden = self.last_hidden[index].to(self.weight.dtype)
        return nn.functional.linear(hidden, self.weight, self.bias).float()


@dataclass
class TargetFeatures:
    features: torch.Tensor  # shape: [B, T, H] (eagle1) or [B, T, 3H] (eagle3)
    last_hidden: torch.Tensor  # shape: [B, T, H], after the final norm (the LM head's input)
    logits: TargetLogits | torch.Tensor  # indexable like [B, T, V]: the target's next-token logits


class OnlineFeatures:
    """Runs the frozen target and returns `TargetFeatures` for a batch; never builds a graph."""

    def __init__(self, target: nn.Module, draft_type: str, aux_layer_ids: list[int]):
        self.target = target
        self.draft_type = draft_type
        self.aux_layer_ids = list(aux_layer_ids)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> TargetFeatures:
        # The base model (no LM head): the head runs later, at trained positions only.
        out = self.target.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        hidden = out.hidden_states  # L+1 tensors; [i] is the input of layer i, [-1] is after the norm
        last = hidden[-1].float()
        if self.draft_type == "eagle3":
            features = torch.cat([hidden[i] for i in self.aux_layer_ids], dim=-1).float()
        else:
            features = last
        head = self.target.get_output_embeddings()
        return TargetFeatures(features=features, last_hidden=last, logits=TargetLogits(last, head.weight, head.bias))


class CachedFeatures:
    """`OnlineFeatures` that keep what the target computed for a row and reuse it on later epochs.

    A small dataset is read many times (the CPU quickstart trains ~20 epochs), and on a small
    target the frozen forward is most of a training step; its output for a row never changes.
    So each row's features and final hidden state (at its real tokens, in the target's own dtype,
    so nothing is rounded) are kept in memory by `row_index`, up to `max_bytes`; a batch whose rows
    are all kept skips the target, any other batch runs it and keeps the rows it did not have.
    Logits stay lazy: the LM head runs where the loss indexes them, as online.
    """

    def __init__(self, online: OnlineFeatures, max_bytes: int):
        self.online, self.max_bytes = online, int(max_bytes)
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # row → ids, features, last
        self.bytes = 0
        self.hits = self.misses = 0  # rows served from memory / computed by the target
        self.full = False

    def __call__(self, batch: dict[str, torch.Tensor]) -> TargetFeatures:
        rows = batch["row_index"].tolist()
        lengths = batch["attention_mask"].sum(-1).tolist()
        if all(self._kept(row, batch["input_ids"][b, : lengths[b]]) for b, row in enumerate(rows)):
            self.hits += len(rows)
            return self._assemble(rows, batch)
        self.misses += len(rows)
        computed = self.online(batch)
        for b, row in enumerate(rows):
            self._keep(row, batch["input_ids"][b, : lengths[b]], computed, b, int(lengths[b]))
        return computed

    def _kept(self, row: int, ids: torch.Tensor) -> bool:
        kept = self.rows.get(row)
        if kept is None:
            return False
        if not torch.equal(kept[0], ids.cpu()):
            raise ValueError(f"prepared row {row} came with other token ids than when its features were kept")
        return True

    def _keep(self, row: int, ids: torch.Tensor, computed: TargetFeatures, b: int, n: int) -> None:
        if row < 0 or row in self.rows or self.full:
            return
        dtype = self.online.target.dtype
        last = computed.last_hidden[b, :n].to("cpu", dtype)
        features = last if self.online.draft_type == "eagle1" else computed.features[b, :n].to("cpu", dtype)
        size = ids.numel() * ids.element_size() + last.nbytes + (0 if features is last else features.nbytes)
        if self.bytes + size > self.max_bytes:
            self.full = True  # later rows are computed each time; the kept ones stay
            logger.info("feature cache full at %.2f GB (%d rows); further rows run the target", self.bytes / 1e9,
                        len(self.rows))
            return
        self.rows[row] = (ids.cpu().clone(), features.clone(), last.clone())
        self.bytes += size

    def _assemble(self, rows: list[int], batch: dict[str, torch.Tensor]) -> TargetFeatures:
        device = batch["input_ids"].device
        B, T = batch["input_ids"].shape
        kept = [self.rows[row] for row in rows]
        features = torch.zeros(B, T, kept[0][1].shape[-1])  # float32 like the online features, zero-padded
        last = torch.zeros(B, T, kept[0][2].shape[-1])
        for b, (ids, row_features, row_last) in enumerate(kept):
            last[b, : len(ids)] = row_last
            features[b, : len(ids)] = row_features
        last = last.to(device)
        features = last if self.online.draft_type == "eagle1" else features.to(device)
        head = self.online.target.get_output_embeddings()
        return TargetFeatures(features=features, last_hidden=last, logits=TargetLogits(last, head.weight, head.bias))
