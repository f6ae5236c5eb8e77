"""`DraftObjective`: the draft plus its training objective, as one module.

The Trainer (and DDP/FSDP around it) sees this module, so the whole objective runs inside its
`forward` and gradients synchronise across processes; the draft itself is `objective.draft`.
"""

from __future__ import annotations

import torch
from torch import nn

from baldeagle.data.features import TargetFeatures
from baldeagle.train.ttt import LOSSES, eagle1_forward, scored_positions, ttt_forward


class DraftObjective(nn.Module):
    def __init__(self, draft: nn.Module, ttt_steps: int = 7, feature_noise: float = 0.2, ttt_step_weight: float = 0.8,
                 loss: str = "kl", feature_dropout: float = 0.0, label_temperature: float = 1.0):
        """loss: the EAGLE-3 step loss, "kl" or "lk" (train/losses.py); EAGLE-1 has its own loss only.
        feature_dropout: EAGLE-3, dropout on the target's fused features in training (EAGLE-1: feature_noise).
        label_temperature: EAGLE-3, the target's draft-vocabulary distribution as p^(1/T) (`sharpen_probs`)."""
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if loss != "kl" and draft.config.draft_type != "eagle3":
            raise ValueError(f"loss={loss} is an EAGLE-3 loss; a {draft.config.draft_type} draft trains with its own")
        if feature_dropout and draft.config.draft_type != "eagle3":
            raise ValueError(f"feature_dropout is for EAGLE-3 drafts; a {draft.config.draft_type} draft has feature_noise")
        if label_temperature <= 0:
            raise ValueError(f"label_temperature must be > 0, got {label_temperature}")
        if label_temperature != 1.0 and draft.config.draft_type != "eagle3":
            raise ValueError(f"label_temperature is for EAGLE-3 drafts; a {draft.config.draft_type} draft has its own loss")
        self.draft = draft
        self.ttt_steps = ttt_steps
        self.ttt_step_weight = ttt_step_weight
        self.feature_noise = feature_noise
        self.feature_dropout = feature_dropout
        self.loss = loss
        self.label_temperature = label_temperature

    def forward(self, batch: dict[str, torch.Tensor], target: TargetFeatures, num_items=None):
        """batch: input_ids, attention_mask, loss_mask [B, T]; target: the frozen target's tensors;
        num_items: the trained tokens of the whole optimizer step (every micro-batch, every process;
        default: this batch's), the loss's denominator, so that every trained token weighs the same.

        → (loss, sums): sums hold detached per-step `loss_k`, `correct_k`, `count_k` totals and the
        objective's own `loss` sum over this batch's `items` (trained tokens), so metrics add up
        exactly across batches and processes before dividing.
        """
        items = scored_positions(batch["loss_mask"], batch["attention_mask"]).sum()
        divisor = items.clamp(min=1) if num_items is None else num_items
        if self.draft.config.draft_type == "eagle3":
            loss, sums = self._eagle3(batch, target, divisor)
        else:
            loss, sums = self._eagle1(batch, target, divisor)
        sums.update(loss=loss.detach() * divisor, items=items.float())
        return loss, sums

    def _eagle3(self, batch, target, divisor):
        # A fresh mask at every read, so kept features (read once per epoch) differ from epoch to epoch.
        features = nn.functional.dropout(target.features, self.feature_dropout, self.training)
        out = ttt_forward(
            self.draft, batch["input_ids"], features, target.logits, batch["loss_mask"],
            steps=self.ttt_steps, attention_mask=batch["attention_mask"], decay=self.ttt_step_weight,
            num_items=divisor, loss=self.loss, label_temperature=self.label_temperature,
        )
        sums = {}
        for k, (loss, correct, count) in enumerate(zip(out.step_losses, out.correct, out.count)):
            sums[f"loss_{k}"] = loss.detach() * divisor  # step k's summed loss over its trained tokens
            sums[f"correct_{k}"] = correct.float()
            sums[f"count_{k}"] = count.float()
        return out.loss, sums

    def _eagle1(self, batch, target, divisor):
        noise = self.feature_noise if self.training else 0.0
        loss, metrics = eagle1_forward(
            self.draft, batch["input_ids"], target.features, batch["loss_mask"], target_logits=target.logits,
            attention_mask=batch["attention_mask"], noise_std=noise, num_items=divisor,
        )
        sums = {
            "loss_0": metrics["l1_sum"] + 0.1 * metrics["ce_sum"],
            "correct_0": metrics["correct"],
            "count_0": metrics["count"],
        }
        return loss, sums
