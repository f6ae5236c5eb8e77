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


@dataclass
class TargetFeatures:
    features: torch.Tensor  # shape: [B, T, H] (eagle1) or [B, T, 3H] (eagle3)
    last_hidden: torch.Tensor  # shape: [B, T, H], after the final norm (the LM head's input)
    logits: torch.Tensor  # shape: [B, T, V], the target's next-token logits


class OnlineFeatures:
    """Runs the frozen target and returns `TargetFeatures` for a batch; never builds a graph."""

    def __init__(self, target: nn.Module, draft_type: str, aux_layer_ids: list[int]):
        self.target = target
        self.draft_type = draft_type
        self.aux_layer_ids = list(aux_layer_ids)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> TargetFeatures:
        out = self.target(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        hidden = out.hidden_states  # L+1 tensors; [i] is the input of layer i, [-1] is after the norm
        last = hidden[-1]
        if self.draft_type == "eagle3":
            features = torch.cat([hidden[i] for i in self.aux_layer_ids], dim=-1)
        else:
            features = last
        return TargetFeatures(features=features.float(), last_hidden=last.float(), logits=out.logits.float())
