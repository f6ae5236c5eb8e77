"""Training-time test (TTT): the EAGLE-3 unroll, its attention, and the EAGLE-1 single step.

Alignment (x_0..x_{T-1} the tokens, row t = after the target read x_t):

    step k, row t:  token x_{t+1+k} (teacher forced), RoPE position t+k,
                    feature = fc(aux features at t) for k = 0, the draft's step-(k-1) output at t after
                    (what `draft.forward` returns: the post-norm state with EAGLE 3.1's feed_normed_hidden),
                    target  = the target's next-token distribution at position t+1+k,
                    trained if x_{t+2+k} is (loss_mask[t+2+k]); rows past the end and
                    padding rows (attention_mask[t] = 0) are dropped.

Attention: a query of step k at row t sees the step-0 keys 0..t (causal, minus padding) and row
t's key of each step 1..k (a diagonal). Each step runs `draft.forward` with a `TTTCache`, so the
projections, RoPE, MLP and norms are exactly the decoding path; only the key set differs.

Work: row t's step-k output feeds only row t itself (its loss at step k, its hidden state and
diagonal key at the later steps), so step k runs only on the rows scored at step k or later:
in chat data, where prompts are not trained, about half of them. Only the step-0 keys are
shared (every row is context for the rows after it), so they are computed for every row by the
k/v projections alone (`draft.keys_values`). Each step's rows are gathered per batch element
into [B, M_k] (`StepRows`). `ttt_forward` is three named steps: which rows each step runs on
(`needed_rows`), the unroll (`ttt_unroll`) and the loss (`ttt_loss`); the tests run the unroll on
every row too (the plain unroll the gathered one must equal).

Memory: the target distribution is restricted to the draft vocab once and kept at the trained
positions only ([N, Vd]; the set of target positions is the same for every step), and each
step's logits are computed for its trained rows only: nothing of size B·T·K·V is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baldeagle.data.features import TargetLogits
from baldeagle.model.layers import sdpa_attention
from baldeagle.train.losses import (
    draft_vocab_labels, eagle1_loss, sharpen_probs, eagle3_lk_loss_from_targets, eagle3_loss_from_targets,
    eagle3_ttt_loss, feature_noise,
)

LOSSES = ("kl", "lk")  # EAGLE-3 step losses: soft cross-entropy, or LK^λ (see train/losses.py)


def shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] → [B, T] with out[:, t] = x[:, t+n], zero past the end."""
    return F.pad(x[:, n:], (0, min(n, x.shape[1])))


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, S, ...], index [B, M] → [B, M, ...] with out[b, m] = x[b, index[b, m]]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def scored_positions(loss_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the target positions p a draft is scored on at step 0 (EAGLE-1's only step):
    p ≥ 1, x_{p+1} trained, and row p-1 a real token (left padding). Their count is the batch's
    number of trained tokens, the `num_items` that makes every token weigh the same."""
    trained = shift_left(loss_mask, 1).bool()
    trained[:, 0] = False
    if attention_mask is not None:
        trained[:, 1:] &= attention_mask[:, :-1].bool()
    return trained


@dataclass
class StepRows:
    """The rows one TTT step runs on, per batch element, in slots [B, M]: M is the most rows any
    element needs; an element with fewer fills its spare slots with other rows, whose outputs
    nothing reads (they get no gradient and are finite, so they change no sum)."""

    index: torch.Tensor  # [B, M] the row t in each slot
    valid: torch.Tensor  # [B, M] False for the filler slots
    slot: torch.Tensor  # [B, T] the slot of row t (meaningful for the rows in the set)

    @classmethod
    def where(cls, keep: torch.Tensor) -> StepRows:
        """keep [B, T] bool → its rows first, in order (a stable sort), then fillers."""
        size = max(int(keep.sum(1).max()), 1)
        index = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :size]
        slot = (keep.long().cumsum(1) - 1).clamp(min=0)
        return cls(index, keep.gather(1, index), slot)

    def slots_of(self, rows: StepRows) -> torch.Tensor:
        """[B, M'] the slots here of `rows`' rows (which must be among these)."""
        return self.slot.gather(1, rows.index)


def ttt_attention(q, keys, values, mask0) -> torch.Tensor:
    """Eager TTT attention, one softmax over [causal step-0 keys | diagonal keys of steps 1..k].

    q [B, Hq, M, D] (M query rows); keys/values: the step-0 keys of every row [B, Hkv, T, D], then
    one [B, Hkv, M, D] per step 1..k, aligned with q's rows; mask0 [B, 1, M, T] bool (True =
    attend) for the step-0 keys → [B, Hq, M, D].
    """
    batch, num_heads, rows, dim = q.shape
    kv_heads, length = keys[0].shape[1], keys[0].shape[2]
    groups = num_heads // kv_heads
    scale = dim**-0.5
    # Query head h uses KV head h // groups (repeat_kv's order), so fold the groups into rows.
    qg = q.reshape(batch, kv_heads, groups * rows, dim)  # [B, Hkv, G*M, D]
    scores0 = (qg @ keys[0].transpose(-1, -2)) * scale  # [B, Hkv, G*M, T]
    hidden = ~mask0.unsqueeze(2)  # [B, 1, 1, M, T]
    scores0 = scores0.view(batch, kv_heads, groups, rows, length).masked_fill(hidden, torch.finfo(q.dtype).min)
    scores0 = scores0.view(batch, kv_heads, groups * rows, length)
    q5 = qg.view(batch, kv_heads, groups, rows, dim)
    diagonal = [((q5 * k[:, :, None]).sum(-1) * scale).view(*qg.shape[:3], 1) for k in keys[1:]]  # [B, Hkv, G*M, 1]
    scores = torch.cat([scores0, *diagonal], dim=-1)  # [B, Hkv, G*M, T + k]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs[..., :length] @ values[0]  # [B, Hkv, G*M, D]
    for j, v in enumerate(values[1:]):
        weight = probs[..., length + j, None].view(batch, kv_heads, groups, rows, 1)
        out = out + (weight * v[:, :, None]).view(qg.shape)
    return out.reshape(batch, num_heads, rows, dim)


def ttt_attention_sdpa(q, keys, values, mask0) -> torch.Tensor:
    """The same attention through SDPA over all keys [B, Hkv, T + k·M, D] with a [causal | eye |
    eye ...] mask: more FLOPs, but fused kernels on GPU keep no M×T scores."""
    rows = q.shape[2]
    eye = torch.eye(rows, dtype=torch.bool, device=q.device).expand(mask0.shape[0], 1, rows, rows)
    mask = torch.cat([mask0, *[eye] * (len(keys) - 1)], dim=-1)
    return sdpa_attention(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask)


class TTTCache:
    """Stands in for `DraftCache` during the unroll.

    It holds the context, every row's step-0 keys/values [B, Hkv, T, D], and the keys/values each
    later step made for its own rows. `ttt_forward` names a step's rows (`begin_step`) before the
    draft runs it; the draft's q/k/v then come in that step's [B, M] layout.
    """

    def __init__(self, context_k, context_v, real: torch.Tensor, impl: str = "sdpa"):
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"TTT attention impl must be 'eager' or 'sdpa', got {impl!r}")
        self.context = (context_k, context_v)
        self.real, self.impl = real, impl  # real [B, T] bool, True = a real token
        self.rows: StepRows | None = None
        self.step = -1
        self.diagonal: list[tuple[StepRows, torch.Tensor, torch.Tensor]] = []  # steps 1..: (rows, k, v)

    def begin_step(self, rows: StepRows) -> None:
        self.step += 1
        self.rows = rows

    def attend(self, q, k, v, attention_mask=None) -> torch.Tensor:
        """q [B, Hq, M, D], this step's k/v [B, Hkv, M, D] → [B, Hq, M, D]."""
        rows = self.rows
        keys, values = [self.context[0]], [self.context[1]]
        # This step's rows are among every earlier step's rows: pick their slots there.
        for earlier, k_j, v_j in self.diagonal:
            slots = earlier.slots_of(rows)[:, None, :, None].expand(-1, k_j.shape[1], -1, k_j.shape[3])
            keys.append(k_j.gather(2, slots))
            values.append(v_j.gather(2, slots))
        if self.step > 0:  # step 0's own keys are in the context already (the same values)
            self.diagonal.append((rows, k, v))
            keys.append(k)
            values.append(v)
        length = self.real.shape[1]
        causal = torch.arange(length, device=q.device) <= rows.index[:, :, None]  # [B, M, T]
        mask0 = (causal & self.real[:, None, :])[:, None]  # [B, 1, M, T]
        attend = ttt_attention if self.impl == "eager" else ttt_attention_sdpa
        return attend(q, keys, values, mask0)


@dataclass
class TTTOutput:
    loss: torch.Tensor  # Σ_k decay^k · loss_k
    step_losses: list[torch.Tensor]
    correct: list[torch.Tensor]  # per step: draft top-1 == target top-1 (sums over trained positions)
    count: list[torch.Tensor]  # per step: trained positions


def real_and_positions(input_ids, attention_mask=None, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] bool (True = a real token) and the position ids [B, T] (default 0..T-1)."""
    batch, length = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    return real, position_ids


def needed_rows(trained: torch.Tensor, real: torch.Tensor, steps: int) -> list[StepRows]:
    """Per step, the rows it runs on. Row t is scored at step k iff position t+1+k is trained and
    row t is real (left padding); step k runs the rows scored at step k or later."""
    runs, needed = [], torch.zeros_like(real)
    for k in reversed(range(steps)):
        needed = needed | (shift_left(trained, 1 + k) & real)
        runs.append(StepRows.where(needed))
    return runs[::-1]


def ttt_unroll(draft, input_ids, features, runs: list[StepRows], real, position_ids, impl: str = "sdpa"):
    """The draft's output at every step on that step's rows: a list of [B, M_k, H], in the slots of
    `runs[k]`. Step k reads token x_{t+1+k} at position t+k and the step-(k-1) output of row t."""
    hidden = draft.project(features)  # [B, T, H], every row: the context keys read it
    cache = TTTCache(*draft.keys_values(shift_left(input_ids, 1), hidden, position_ids), real, impl)
    outputs = []
    for k, rows in enumerate(runs):
        hidden = take(hidden, rows.index if k == 0 else runs[k - 1].slots_of(rows))  # [B, M_k, H]
        cache.begin_step(rows)
        ids, positions = take(shift_left(input_ids, 1 + k), rows.index), take(position_ids, rows.index) + k
        hidden = draft(ids, hidden, positions, cache=cache)  # [B, M_k, H]
        outputs.append(hidden)
    return outputs


def ttt_loss(draft, outputs, runs, trained, real, target_logits, decay: float = 0.8, num_items=None,
             loss: str = "kl", label_temperature: float = 1.0) -> TTTOutput:
    """Score the unroll: step k's output at row t against the target at t+1+k, for every trained
    position (`trained` [B, T], `scored_positions`); losses from train/losses.py (`loss`: kl or lk;
    `label_temperature`: the target's draft-vocabulary distribution as p^(1/T), `sharpen_probs`)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    b_idx, p_idx = trained.nonzero(as_tuple=True)  # [N]
    # Only trained positions are read (target_logits may compute lazily, and for kept rows only
    # over the draft vocabulary: see TargetLogits.draft_vocab). [N, Vd], [N], [N] or None.
    if isinstance(target_logits, TargetLogits) and target_logits.argmax is not None:
        target_probs, target_argmax, mass = target_logits.draft_vocab((b_idx, p_idx), draft.t2d, loss == "lk")
    else:
        target_probs, target_argmax, mass = draft_vocab_labels(target_logits[b_idx, p_idx], draft.t2d, loss == "lk")
    target_probs = sharpen_probs(target_probs, label_temperature)  # the argmax (accuracy, OOV) is unchanged
    scored, keeps = [], []
    for k, (hidden, rows) in enumerate(zip(outputs, runs)):
        row = p_idx - 1 - k  # the row whose step-k output predicts position p
        keep = (row >= 0) & real[b_idx, row.clamp(min=0)]  # the chain must start on a real token (left padding)
        b_k, t_k = b_idx[keep], row[keep]
        scored.append(hidden[b_k, rows.slot[b_k, t_k]])  # [N_k, H]
        keeps.append(keep)
    # One LM head call for every step: on CPU one large matmul (and its weight gradient) runs
    # faster than K small ones; the LM head is the draft's largest matmul.
    all_logits = draft.logits(torch.cat(scored)).split([len(h) for h in scored])  # [N_k, Vd] per step
    if loss == "lk":
        steps = [eagle3_lk_loss_from_targets(logits, target_probs[keep], target_argmax[keep], keep[keep], num_items,
                                             target_mass=mass[keep]) for logits, keep in zip(all_logits, keeps)]
    else:
        steps = [eagle3_loss_from_targets(logits, target_probs[keep], target_argmax[keep], keep[keep], num_items)
                 for logits, keep in zip(all_logits, keeps)]
    losses, correct, count = (list(column) for column in zip(*steps))
    return TTTOutput(eagle3_ttt_loss(losses, decay), losses, correct, count)


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
    loss: str = "kl",
    label_temperature: float = 1.0,
) -> TTTOutput:
    """Unroll an EAGLE-3 draft for `steps` steps and return the weighted loss and per-step metrics.

    input_ids [B, T]; features [B, T, 3H] (fused aux hidden states at each position);
    target_logits [B, T, V] (the target's next-token logits at each position); loss_mask [B, T]
    (1 = token trained); attention_mask [B, T] (1 = real token); position_ids [B, T] (default 0..T-1).
    impl: "sdpa" (default; measured faster and leaner on an H200 and on CPU) or "eager" (same numbers).
    loss: "kl" (soft cross-entropy, default) or "lk" (LK^λ, arXiv 2602.23881), per step (train/losses.py).
    label_temperature: the target's distribution over the draft vocabulary as p^(1/T) (1 = as it is).
    """
    real, position_ids = real_and_positions(input_ids, attention_mask, position_ids)
    # Target position p = t+1+k is trained iff x_{p+1} is: the same positions at every step.
    trained = scored_positions(loss_mask, real)
    runs = needed_rows(trained, real, steps)
    outputs = ttt_unroll(draft, input_ids, features, runs, real, position_ids, impl)
    return ttt_loss(draft, outputs, runs, trained, real, target_logits, decay, num_items, loss, label_temperature)


@torch.no_grad()
def rollout_predictions(draft, input_ids: torch.Tensor, features: torch.Tensor, steps: int,
                        rows: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The draft's own greedy chain from every row in `rows`, tokens teacher-forced: what chain
    decoding drafts, as long as the draft has been right so far.

    input_ids [B, T]; features [B, T, F] (the target's, as in training); rows [B, T] bool, the rows
    to roll out from (a row's step-0 keys are context for later rows either way) → [B, steps, T]
    target token ids: out[b, k, t] is the draft's guess for x_{t+2+k} (its step-k output at row t),
    -1 where row t was not rolled out. EAGLE-1 and EAGLE-3 alike.
    """
    real, position_ids = real_and_positions(input_ids, attention_mask)
    run = StepRows.where(rows & real)
    outputs = ttt_unroll(draft, input_ids, features, [run] * steps, real, position_ids)  # [B, M, H] per step
    out = input_ids.new_full((input_ids.shape[0], steps, input_ids.shape[1]), -1)
    b_valid = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(run.index)[run.valid]
    for k, hidden in enumerate(outputs):
        guess = draft.to_target_ids(draft.logits(hidden).argmax(dim=-1))  # [B, M]
        out[b_valid, k, run.index[run.valid]] = guess[run.valid]
    return out


def first_step_candidates(draft, input_ids: torch.Tensor, features: torch.Tensor, width: int,
                          rows: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The draft's `width` best first guesses from every row in `rows`, best first: the depth-1 fan a
    tree decoder drafts there. Same inputs as `rollout_predictions` → [B, width, T] target token
    ids: out[b, j, t] is the draft's j-th choice for x_{t+2} at row t, -1 where row t was not run."""
    real, position_ids = real_and_positions(input_ids, attention_mask)
    run = StepRows.where(rows & real)
    (hidden,) = ttt_unroll(draft, input_ids, features, [run], real, position_ids)  # [B, M, H]
    out = input_ids.new_full((input_ids.shape[0], width, input_ids.shape[1]), -1)
    b_valid = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(run.index)[run.valid]
    best = draft.to_target_ids(draft.logits(hidden).topk(width, dim=-1).indices)  # [B, M, width]
    out[b_valid, :, run.index[run.valid]] = best[run.valid]  # [n, width] into [n, width]
    return out


@torch.no_grad()
def second_step_candidates(draft, input_ids: torch.Tensor, features: torch.Tensor, width: int,
                           rows: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The depth-2 tree a decoder grows (`grow_tree`, topk `width`) from every row in `rows`, inputs
    teacher-forced: the draft's `width` best first guesses and, for each, its `width` best second
    guesses (the draft's second step reading that first guess). Same inputs as `rollout_predictions`
    → (first ids [B, T, w] target ids, best first, -1 where row t was not run; their log-probabilities
    [B, T, w]; child ids [B, T, w, w] (the children of first guess j in [..., j, :]); their
    log-probabilities [B, T, w, w])."""
    real, position_ids = real_and_positions(input_ids, attention_mask)
    run = StepRows.where(rows & real)
    hidden = draft.project(features)
    cache = TTTCache(*draft.keys_values(shift_left(input_ids, 1), hidden, position_ids), real)
    cache.begin_step(run)
    positions = take(position_ids, run.index)
    first = draft(take(shift_left(input_ids, 1), run.index), take(hidden, run.index), positions, cache=cache)
    first_logp, first_ids = torch.log_softmax(draft.logits(first).float(), dim=-1).topk(width, dim=-1)  # [B, M, w]
    child_logp, child_ids = [], []
    for j in range(width):
        cache.step, cache.diagonal = 0, []  # each first guess is its own second step, beside the others
        cache.begin_step(run)
        second = draft(draft.to_target_ids(first_ids[..., j]), first, positions + 1, cache=cache)
        logp, ids = torch.log_softmax(draft.logits(second).float(), dim=-1).topk(width, dim=-1)
        child_logp.append(logp)
        child_ids.append(ids)
    child_logp, child_ids = torch.stack(child_logp, dim=2), torch.stack(child_ids, dim=2)  # [B, M, w, w]
    b_valid = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(run.index)[run.valid]
    t_valid = run.index[run.valid]
    batch, length = input_ids.shape
    out_first = input_ids.new_full((batch, length, width), -1)
    out_first_logp = features.new_full((batch, length, width), float("-inf"), dtype=torch.float32)
    out_child = input_ids.new_full((batch, length, width, width), -1)
    out_child_logp = features.new_full((batch, length, width, width), float("-inf"), dtype=torch.float32)
    out_first[b_valid, t_valid] = draft.to_target_ids(first_ids)[run.valid]
    out_first_logp[b_valid, t_valid] = first_logp[run.valid]
    out_child[b_valid, t_valid] = draft.to_target_ids(child_ids)[run.valid]
    out_child_logp[b_valid, t_valid] = child_logp[run.valid]
    return out_first, out_first_logp, out_child, out_child_logp


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
    _, position_ids = real_and_positions(input_ids, attention_mask, position_ids)
    inputs = feature_noise(features, noise_std) if noise_std else features
    out = draft(shift_left(input_ids, 1), inputs, position_ids, attention_mask=attention_mask)  # [B, T, H]
    b_idx, p_idx = scored_positions(loss_mask, attention_mask).nonzero(as_tuple=True)  # [N]
    pred, target_next = out[b_idx, p_idx - 1], features[b_idx, p_idx]  # [N, H]
    if target_logits is None:
        with torch.no_grad():
            target = draft.logits(target_next.to(draft.lm_head.weight.dtype))
    else:
        target = target_logits[b_idx, p_idx]  # [N, V]
    ones = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
    return eagle1_loss(pred, target_next, draft.logits(pred), target, ones, num_items)
