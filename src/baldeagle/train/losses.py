"""The EAGLE-1 and EAGLE-3 losses, as pure functions over already-aligned tensors.

Shapes use [...] for any leading dims ([B, T], or [N] after gathering the masked rows); `mask`
is 1 where the position counts. Every loss is a masked mean; pass `num_items` (e.g. the
trained-token count of the whole accumulated batch) to divide by that instead, so that
gradient accumulation and data parallelism weigh every token the same. Metrics come back as
sums and counts, so a trainer can add them across batches and devices before dividing.

Choices:
- Soft cross-entropy, both losses: -Σ_v p(v) log q(v), p = target softmax (no gradient),
  q = draft log_softmax (with gradient), in float32.
- EAGLE-3: p is renormalised over the draft vocabulary (softmax of the target logits at the
  draft vocab ids). Positions whose target argmax over the FULL vocabulary is outside the draft
  vocabulary add nothing to the loss, but stay in its denominator (all trained positions, so
  loss · count is the sum and `num_items` can be a plain trained-token count) and in accuracy,
  where they count as wrong (the draft cannot propose that token, as in an engine), so acc_k
  matches acceptance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from baldeagle.model.vocab import target_to_draft_ids


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, num_items=None) -> torch.Tensor:
    total = (values * mask).sum()
    if num_items is None:
        num_items = mask.sum().clamp(min=1)
    return total / num_items


def soft_cross_entropy(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """draft_logits [..., V], target_probs [..., V] → [...]: -Σ p log_softmax(draft)."""
    return -(target_probs * F.log_softmax(draft_logits.float(), dim=-1)).sum(-1)


def eagle1_loss(pred_hidden, target_next_hidden, draft_logits, target_logits, loss_mask, num_items=None):
    """EAGLE-1: 1.0 · SmoothL1(pred, f_{t+1}) + 0.1 · soft CE(lm_head(pred), softmax(target logits)).

    pred_hidden / target_next_hidden [..., H]; draft_logits / target_logits [..., V]; loss_mask [...].
    Both terms carry gradient into the draft. → (loss, metrics) with metrics holding detached sums:
    l1_sum, ce_sum, correct (draft argmax == target argmax), count (masked positions).
    """
    mask = loss_mask.float()
    l1 = F.smooth_l1_loss(pred_hidden.float(), target_next_hidden.detach().float(), reduction="none").mean(-1)
    target_probs = torch.softmax(target_logits.detach().float(), dim=-1)
    ce = soft_cross_entropy(draft_logits, target_probs)
    loss = 1.0 * _masked_mean(l1, mask, num_items) + 0.1 * _masked_mean(ce, mask, num_items)
    correct = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float() * mask
    metrics = {
        "l1_sum": (l1 * mask).sum().detach(),
        "ce_sum": (ce * mask).sum().detach(),
        "correct": correct.sum().detach(),
        "count": mask.sum().detach(),
    }
    return loss, metrics


def draft_vocab_targets(target_logits: torch.Tensor, t2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits [..., V] → (probs over the draft vocab [..., Vd] float32, draft id of the
    target's full-vocab argmax [...], -1 where that token is outside the draft vocab)."""
    target_logits = target_logits.detach()
    used = t2d.nonzero().squeeze(-1)  # [Vd] target ids of the draft vocab
    probs = torch.softmax(target_logits.index_select(-1, used).float(), dim=-1)  # renormalised over the draft vocab
    argmax_draft = target_to_draft_ids(target_logits.argmax(-1), t2d)
    return probs, argmax_draft


def eagle3_loss_from_targets(draft_logits, target_probs, target_argmax_draft, loss_mask, num_items=None):
    """draft_logits [..., Vd], target_probs [..., Vd], target_argmax_draft [...] (-1 = out of the
    draft vocab), loss_mask [...] → (loss, correct, count). See the module notes."""
    mask = loss_mask.bool()
    in_vocab = mask & (target_argmax_draft >= 0)
    total = (soft_cross_entropy(draft_logits, target_probs) * in_vocab).sum()  # OOV-argmax positions add 0
    count = mask.sum()
    loss = total / (count.clamp(min=1) if num_items is None else num_items)  # loss · count = the sum
    correct = ((draft_logits.argmax(-1) == target_argmax_draft) & mask).sum()
    return loss, correct.detach(), count


def eagle3_ttt_loss(step_losses: list[torch.Tensor], decay: float = 0.8) -> torch.Tensor:
    """Σ_k decay^k · loss_k over the K unrolled steps (K = len(step_losses))."""
    return sum(decay**k * loss for k, loss in enumerate(step_losses))


def tau_sim(accs: list[float]) -> float:
    """Simulated acceptance length 1 + Σ_k Π_{i≤k} acc_i from per-step top-1 accuracies."""
    tau, running = 1.0, 1.0
    for acc in accs:
        running *= float(acc)
        tau += running
    return tau


def feature_noise(features: torch.Tensor, std: float = 0.2, kind: str = "uniform", seq_len: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """features + noise. "uniform" (EAGLE-1): U(-0.5, 0.5) · std · 512 / seq_len; "normal": N(0, std²)."""
    if std == 0:
        return features
    noise = torch.empty(features.shape, dtype=torch.float32, device=features.device)
    if kind == "uniform":
        seq_len = seq_len or features.shape[-2]
        noise = (noise.uniform_(generator=generator) - 0.5) * (std * 512 / seq_len)
    elif kind == "normal":
        noise = noise.normal_(generator=generator) * std
    else:
        raise ValueError(f"feature noise kind must be 'uniform' or 'normal', got {kind!r}")
    return features + noise.to(features.dtype)
