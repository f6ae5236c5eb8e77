"""Training-time test (TTT): the EAGLE-3 unroll, its attention, and the EAGLE-1 single step.

Alignment (x_0..x_{T-1} the tokens, row t = after the target read x_t):

    step k, row t:  token x_{t+1+k} (teacher forced), RoPE position t+k,
                    feature = fc(aux features at t) for k = 0, the draft's step-(k-1) output at t after,
                    target  = the target's next-token distribution at position t+1+k,
                    trained if x_{t+2+k} is (loss_mask[t+2+k]); rows past the end and
                    padding rows (attention_mask[t] = 0) are dropped.

Attention: a query of step k at row t sees the step-0 keys 0..t (causal, minus padding) and row
t's key of each step 1..k (a diagonal). Each step runs `draft.forward` with a `TTTCache`, so the
projections, RoPE, MLP and norms are exactly the decoding path; only the key set differs.

Memory: the target distribution is restricted to the draft vocab once and kept at the trained
positions only ([N, Vd]; the set of target positions is the same for every step), and each
step's logits are computed for its trained rows only: nothing of size B·T·K·V is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baldeagle.model.layers import build_mask, sdpa_attention
from baldeagle.train.losses import draft_vocab_targets, eagle1_loss, eagle3_loss_from_targets, feature_noise


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] → [B, T] with out[:, t] = x[:, t+n], zero past the end."""
    return F.pad(x[:, n:], (0, min(n, x.shape[1])))


def ttt_attention(q, keys, values, mask0) -> torch.Tensor:
    """Eager TTT attention, one softmax over [causal step-0 keys | diagonal keys of steps 1..k].

    q [B, Hq, T, D]; keys/values: one [B, Hkv, T, D] per step so far (step 0 first);
    mask0 [B|1, 1, T, T] bool (True = attend) for the step-0 keys → [B, Hq, T, D].
    """
    batch, num_heads, length, dim = q.shape
    kv_heads = keys[0].shape[1]
    groups = num_heads // kv_heads
    scale = dim**-0.5
    # Query head h uses KV head h // groups (repeat_kv's order), so fold the groups into rows.
    qg = q.reshape(batch, kv_heads, groups * length, dim)  # [B, Hkv, G*T, D]
    scores0 = (qg @ keys[0].transpose(-1, -2)) * scale  # [B, Hkv, G*T, T]
    hidden = ~mask0.unsqueeze(2)  # [B|1, 1, 1, T, T]
    scores0 = scores0.view(batch, kv_heads, groups, length, length).masked_fill(hidden, torch.finfo(q.dtype).min)
    scores0 = scores0.view(batch, kv_heads, groups * length, length)
    q5 = qg.view(batch, kv_heads, groups, length, dim)
    diagonal = [((q5 * k[:, :, None]).sum(-1) * scale).view(*qg.shape[:3], 1) for k in keys[1:]]  # [B, Hkv, G*T, 1]
    scores = torch.cat([scores0, *diagonal], dim=-1)  # [B, Hkv, G*T, T + k]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs[..., :length] @ values[0]  # [B, Hkv, G*T, D]
    for j, v in enumerate(values[1:]):
        weight = probs[..., length + j, None].view(batch, kv_heads, groups, length, 1)
        out = out + (weight * v[:, :, None]).view(qg.shape)
    return out.reshape(batch, num_heads, length, dim)


def ttt_attention_sdpa(q, keys, values, mask0) -> torch.Tensor:
    """The same attention through SDPA over all steps' keys [B, Hkv, (k+1)·T, D] with a
    [causal | eye | eye ...] mask: more FLOPs, but fused kernels on GPU keep no T×T scores."""
    length = q.shape[2]
    eye = torch.eye(length, dtype=torch.bool, device=q.device).expand(mask0.shape[0], 1, length, length)
    mask = torch.cat([mask0.expand(mask0.shape[0], 1, length, length), *[eye] * (len(keys) - 1)], dim=-1)
    return sdpa_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask)


class TTTCache:
    """Stands in for `DraftCache` during the unroll: holds every step's keys/values."""

    def __init__(self, attention_mask: torch.Tensor | None = None, impl: str = "sdpa"):
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"TTT attention impl must be 'eager' or 'sdpa', got {impl!r}")
        self.padding, self.impl = attention_mask, impl  # padding [B, T], 1 = real token
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def attend(self, q, k, v, attention_mask=None) -> torch.Tensor:
        """q [B, Hq, T, D], this step's k/v [B, Hkv, T, D] → [B, Hq, T, D]."""
        self.keys.append(k)
        self.values.append(v)
        mask0 = build_mask(self.padding, q.shape[2], 0, q.device)  # [B|1, 1, T, T]
        attend = ttt_attention if self.impl == "eager" else ttt_attention_sdpa
        return attend(q, self.keys, self.values, mask0)


@dataclass
class TTTOutput:
    loss: torch.Tensor  # Σ_k decay^k · loss_k
    step_losses: list[torch.Tensor]
    correct: list[torch.Tensor]  # per step: draft top-1 == target top-1 (sums over trained positions)
    count: list[torch.Tensor]  # per step: trained positions
    hidden: list[torch.Tensor] | None = None  # per step: draft outputs [B, T, H] (return_hidden=True)

    def accuracies(self) -> list[float]:
        return [float(c) / max(float(n), 1.0) for c, n in zip(self.correct, self.count)]


def ttt_forward(
    draft,
    input_ids: torch.Tensor,
    features: torch.Tensor,
    target_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    steps: int = 7,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    decay: float = 0.8,
    impl: str = "sdpa",
    num_items=None,
    return_hidden: bool = False,
) -> TTTOutput:
    """Unroll an EAGLE-3 draft for `steps` steps and return the weighted loss and per-step metrics.

    input_ids [B, T]; features [B, T, 3H] (fused aux hidden states at each position);
    target_logits [B, T, V] (the target's next-token logits at each position); loss_mask [B, T]
    (1 = token trained); attention_mask [B, T] (1 = real token); position_ids [B, T] (default 0..T-1).
    impl: "sdpa" (default; measured faster and leaner on an H200 and on CPU) or "eager" (same numbers).
    """
    batch, length = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    # Target position p = t+1+k is trained iff x_{p+1} is: the same positions at every step.
    trained = shift_left(loss_mask, 1).bool()
    b_idx, p_idx = trained.nonzero(as_tuple=True)  # [N]
    # Only trained positions are gathered (target_logits may compute lazily, see TargetLogits).
    target_probs, target_argmax = draft_vocab_targets(target_logits[b_idx, p_idx], draft.t2d)  # [N, Vd], [N]

    real = attention_mask.bool() if attention_mask is not None else None  # [B, T]
    cache = TTTCache(attention_mask, impl)
    hidden = draft.project(features)  # [B, T, H]
    losses, corrects, counts, outputs = [], [], [], []
    for k in range(steps):
        hidden = draft(shift_left(input_ids, 1 + k), hidden, position_ids + k, cache=cache)  # [B, T, H]
        rows = p_idx - 1 - k
        keep = rows >= 0
        if real is not None:  # the chain must start on a real token (left padding)
            keep &= real[b_idx, rows.clamp(min=0)]
        logits = draft.logits(hidden[b_idx[keep], rows[keep]])  # [N_k, Vd]
        ones = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        loss, correct, count = eagle3_loss_from_targets(
            logits, target_probs[keep], target_argmax[keep], ones, num_items
        )
        losses.append(loss), corrects.append(correct), counts.append(count)
        if return_hidden:
            outputs.append(hidden)
    total = sum(decay**k * loss for k, loss in enumerate(losses))
    return TTTOutput(total, losses, corrects, counts, outputs if return_hidden else None)


def eagle1_forward(
    draft,
    input_ids: torch.Tensor,
    features: torch.Tensor,
    loss_mask: torch.Tensor,
    target_logits: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    noise_std: float = 0.0,
    num_items=None,
):
    """EAGLE-1's single step: row t reads (x_{t+1}, f_t + noise) and predicts f_{t+1}; trained where
    x_{t+2} is (the alignment of TTT step 0). features [B, T, H] = `hidden_states[-1]`;
    target_logits [B, T, V] (default: the frozen LM head on the features) → (loss, metrics)."""
    batch, length = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    inputs = feature_noise(features, noise_std) if noise_std else features
    out = draft(shift_left(input_ids, 1), inputs, position_ids, attention_mask=attention_mask)  # [B, T, H]
    trained = shift_left(loss_mask, 1).bool()
    trained[:, 0] = False  # target position p = t+1 ≥ 1
    if attention_mask is not None:  # row t = p-1 must be a real token (left padding)
        trained[:, 1:] &= attention_mask[:, :-1].bool()
    b_idx, p_idx = trained.nonzero(as_tuple=True)  # [N]
    pred, target_next = out[b_idx, p_idx - 1], features[b_idx, p_idx]  # [N, H]
    if target_logits is None:
        with torch.no_grad():
            target = draft.logits(target_next.to(draft.lm_head.weight.dtype))
    else:
        target = target_logits[b_idx, p_idx]  # [N, V]
    ones = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    return eagle1_loss(pred, target_next, draft.logits(pred), target, ones, num_items)
