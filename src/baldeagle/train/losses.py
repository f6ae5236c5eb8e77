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
- EAGLE-3 `loss=lk` (`eagle3_lk_loss_from_targets`): the same masking, denominator and metrics,
  with the LK^λ loss of Samarin et al., "LK Losses: Direct Acceptance Rate Optimization for
  Speculative Decoding" (arXiv 2602.23881) per position instead of the soft cross-entropy.
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


def draft_vocab_mass(target_logits: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
    """Target logits [..., V] → [...] float32: the target's probability of the draft vocabulary as a
    whole, Σ_{v ∈ draft vocab} softmax(target logits)[v] (1 when the draft vocabulary is the target's)."""
    target_logits = target_logits.detach().float()
    used = t2d.nonzero().squeeze(-1)
    return torch.exp(torch.logsumexp(target_logits.index_select(-1, used), -1) - torch.logsumexp(target_logits, -1))


def draft_vocab_labels(target_logits: torch.Tensor, t2d: torch.Tensor, with_mass: bool = False):
    """Target logits [..., V] → what an EAGLE-3 loss reads: `draft_vocab_targets` and, when asked
    (LK), `draft_vocab_mass` (else None)."""
    probs, argmax = draft_vocab_targets(target_logits, t2d)
    return probs, argmax, draft_vocab_mass(target_logits, t2d) if with_mass else None


def sharpen_probs(probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """probs [..., V] → p^(1/T) renormalised over the last dim (float32): T < 1 sharpens towards the
    argmax, T > 1 flattens, T = 1 returns `probs` itself. The ranking, and so the argmax, is unchanged.

    Why: greedy decoding accepts a drafted token only if it is the target's argmax, while the soft
    cross-entropy spends the draft's capacity on the whole distribution; T < 1 moves the loss's weight
    towards the target's top tokens (the ones a chain or fan drafts) and keeps their order."""
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.float().clamp_min(1e-30)) / temperature, dim=-1)


def _eagle3_step(per_position, draft_logits, target_argmax_draft, loss_mask, num_items=None):
    """A per-position loss [...] → (loss, correct, count), the EAGLE-3 way (see the module notes)."""
    mask = loss_mask.bool()
    in_vocab = mask & (target_argmax_draft >= 0)
    total = (per_position * in_vocab).sum()  # OOV-argmax positions add 0
    count = mask.sum()
    loss = total / (count.clamp(min=1) if num_items is None else num_items)  # loss · count = the sum
    correct = ((draft_logits.argmax(-1) == target_argmax_draft) & mask).sum()
    return loss, correct.detach(), count


def eagle3_loss_from_targets(draft_logits, target_probs, target_argmax_draft, loss_mask, num_items=None):
    """draft_logits [..., Vd], target_probs [..., Vd], target_argmax_draft [...] (-1 = out of the
    draft vocab), loss_mask [...] → (loss, correct, count). See the module notes."""
    return _eagle3_step(soft_cross_entropy(draft_logits, target_probs), draft_logits, target_argmax_draft,
                        loss_mask, num_items)


LK_ETA = 3.0  # η of LK^λ's adaptive weight λ = exp(-η·α): the paper's best setting (its authors' recipe: 3)


def lk_lambda_loss(draft_logits: torch.Tensor, target_probs: torch.Tensor, target_mass: torch.Tensor | None = None,
                   eta: float = LK_ETA) -> torch.Tensor:
    """LK^λ per position (arXiv 2602.23881), in float32: draft_logits [..., Vd], target_probs [..., Vd]
    (the target renormalised over the draft vocabulary, `draft_vocab_targets`), target_mass [...]
    (`draft_vocab_mass`; None = 1) → [...].

        q      = softmax(draft_logits)                      the draft, over the draft vocabulary
        p~     = target_probs                               the target renormalised there (loss=kl's target)
        p      = p~ · target_mass                           the target's own probabilities of those tokens
        α      = Σ_v min(p_v, q_v) = 1 - TV(p, q)           the acceptance rate of a draft token from q
        λ      = exp(-η · sg[α])                            sg = stop-gradient: a weight, not a term
        LK^λ   = λ · KL(p~ ‖ q) + (1 - λ) · (1 - α)

    α is the probability that speculative sampling accepts a token drawn from q (min(1, p/q)
    acceptance), with p over the target's full vocabulary: the draft can only propose draft-vocab
    tokens, so the target's mass outside them is never accepted (p is not renormalised here, as in
    the paper's authors' own implementation; the KL term keeps loss=kl's renormalised target).
    BaldEagle's decoding verifies greedily (a draft token is accepted iff it is the target's argmax,
    what acc_k counts); the loss is still the paper's, defined on the two distributions.
    TV is the objective acceptance asks for, but its gradient is weak where the draft is far off;
    λ leans on KL there (α → 0, λ → 1) and moves to TV as the draft aligns (α = 1: λ = e^-η).

    Why LK^λ and not the paper's other loss, LK^α = -log α (hyperparameter-free): LK^λ is the one
    that mixes in KL, which keeps a random draft's early gradient strong, with η = 3, the setting
    reported as the paper's best and the default of its authors' EAGLE-3 script (SpecForge
    `--kl-decay 3.0`). One deliberate difference from that script: λ is computed per position from
    that position's α, where the script uses the step's batch-mean α. Per position keeps the loss a
    plain sum over positions, so `num_items`, gradient accumulation and data parallelism weigh every
    token the same whatever the batching (the invariance every loss here keeps).
    """
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    p_tilde = target_probs.float()
    p = p_tilde if target_mass is None else p_tilde * target_mass.float().unsqueeze(-1)
    alpha = torch.minimum(p, log_q.exp()).sum(-1)
    kl = (torch.xlogy(p_tilde, p_tilde) - p_tilde * log_q).sum(-1)  # 0 · log 0 = 0
    weight = torch.exp(-eta * alpha.detach())
    return weight * kl + (1 - weight) * (1 - alpha)


def eagle3_lk_loss_from_targets(draft_logits, target_probs, target_argmax_draft, loss_mask, num_items=None,
                                target_mass=None, eta: float = LK_ETA):
    """`eagle3_loss_from_targets` with LK^λ (`lk_lambda_loss`) in place of the soft cross-entropy:
    the same masking (OOV-argmax positions add 0), denominator (`num_items`) and (loss, correct, count)."""
    return _eagle3_step(lk_lambda_loss(draft_logits, target_probs, target_mass, eta), draft_logits,
                        target_argmax_draft, loss_mask, num_items)


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
