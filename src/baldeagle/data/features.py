"""Target features for training, computed online: the frozen target runs on each batch.

A draft learns from two things the target computes per position t:
- its features: EAGLE-1 uses the last hidden state after the final norm (`hidden_states[-1]`,
  the LM head's input); EAGLE-3 the hidden states entering the aux layers (`hidden_states[i]`,
  concatenated to 3H);
- its next-token distribution, as logits (the training targets).
The offline feature store (`baldeagle features`) holds the same tensors on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
