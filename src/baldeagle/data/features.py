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

from baldeagle.model.vocab import target_to_draft_ids

logger = logging.getLogger(__name__)


class TargetLogits:
    """The target's next-token logits, computed only where they are indexed.

    Training needs them at trained positions only (often a third of a chat row), and the LM head
    is a large share of a small target's forward, so `logits[b_idx, p_idx]` runs the head on just
    those rows: shape [N, V]. Indexing works like a [B, T, V] tensor's first two dimensions.

    An EAGLE-3 loss reads only the draft vocabulary's logits plus two facts about the full
    vocabulary per position: its argmax and its log-sum-exp. When those are known (`argmax`,
    `logsumexp` [B, T], kept by `CachedFeatures` for reused rows), `draft_vocab` runs the head on
    the draft vocabulary's rows only (8192 of 49152 for SmolLM2): the same numbers, a sixth of the work.
    """

    def __init__(self, last_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 argmax: torch.Tensor | None = None, logsumexp: torch.Tensor | None = None):
        self.last_hidden, self.weight, self.bias = last_hidden, weight, bias  # [B, T, H], [V, H], [V]
        self.argmax, self.logsumexp = argmax, logsumexp  # [B, T] full-vocabulary statistics, or None

    @torch.no_grad()
    def __getitem__(self, index) -> torch.Tensor:
        hidden = self.last_hidden[index].to(self.weight.dtype)
        return nn.functional.linear(hidden, self.weight, self.bias).float()

    @torch.no_grad()
    def draft_vocab(self, index, t2d: torch.Tensor, with_mass: bool = False):
        """With the statistics kept: what `train.losses.draft_vocab_labels` gives on the full logits at
        `index`: (probs over the draft vocab [N, Vd], draft id of the full argmax [N] (-1 outside), the
        draft vocabulary's share of the target's probability [N] or None)."""
        if self.argmax is None:
            raise ValueError("draft_vocab needs the kept full-vocabulary statistics (argmax, logsumexp)")
        used = t2d.nonzero().squeeze(-1)  # [Vd] target ids of the draft vocabulary
        bias = None if self.bias is None else self.bias[used]
        hidden = self.last_hidden[index].to(self.weight.dtype)
        logits = nn.functional.linear(hidden, self.weight[used], bias).float()  # [N, Vd]
        mass = torch.exp(torch.logsumexp(logits, -1) - self.logsumexp[index]) if with_mass else None
        return torch.softmax(logits, dim=-1), target_to_draft_ids(self.argmax[index], t2d), mass


@torch.no_grad()
def full_vocab_stats(last_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """last_hidden [n, H] → (argmax [n], logsumexp [n] float32) of the LM head's logits, `chunk`
    positions at a time so that a long row never holds [n, V] floats at once."""
    argmax, lse = [], []
    for part in last_hidden.split(chunk):
        logits = nn.functional.linear(part.to(weight.dtype), weight, bias).float()
        argmax.append(logits.argmax(-1))
        lse.append(torch.logsumexp(logits, -1))
    return torch.cat(argmax), torch.cat(lse)


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
    Logits stay lazy: the LM head runs where the loss indexes them, as online. For EAGLE-3 each kept
    row also keeps its full-vocabulary argmax and log-sum-exp per position (12 bytes a token,
    computed once), so a reused row's loss runs the head on the draft vocabulary only.
    """

    def __init__(self, online: OnlineFeatures, max_bytes: int):
        self.online, self.max_bytes = online, int(max_bytes)
        self.rows: dict[int, tuple] = {}  # row → ids, features, last, (argmax, logsumexp) or None
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
        stats = [self._stats(computed.last_hidden[b, :n]) for b, n in enumerate(lengths)]
        for b, row in enumerate(rows):
            self._keep(row, batch["input_ids"][b, : lengths[b]], computed, b, int(lengths[b]), stats[b])
        if stats[0] is not None:  # this batch's loss, too, reads the draft vocabulary's head only
            computed.logits = TargetLogits(computed.last_hidden, *self._head(), **self._padded(stats, batch))
        return computed

    def _stats(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A row's full-vocabulary (argmax, logsumexp) at its real positions; None for EAGLE-1 (its
        loss reads the full logits)."""
        if self.online.draft_type != "eagle3":
            return None
        weight, bias = self._head()
        return full_vocab_stats(last.to(weight.dtype), weight, bias)

    @staticmethod
    def _padded(stats: list[tuple[torch.Tensor, torch.Tensor]], batch) -> dict[str, torch.Tensor]:
        """Per-row statistics → argmax, logsumexp [B, T] (padding holds 0: no loss indexes it)."""
        B, T = batch["input_ids"].shape
        argmax, lse = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T)
        for b, (row_argmax, row_lse) in enumerate(stats):
            argmax[b, : len(row_argmax)], lse[b, : len(row_lse)] = row_argmax.cpu(), row_lse.cpu()
        device = batch["input_ids"].device
        return dict(argmax=argmax.to(device), logsumexp=lse.to(device))

    def _kept(self, row: int, ids: torch.Tensor) -> bool:
        kept = self.rows.get(row)
        if kept is None:
            return False
        if not torch.equal(kept[0], ids.cpu()):
            raise ValueError(f"prepared row {row} came with other token ids than when its features were kept")
        return True

    def _keep(self, row: int, ids: torch.Tensor, computed: TargetFeatures, b: int, n: int, stats) -> None:
        if row < 0 or row in self.rows or self.full:
            return
        dtype = self.online.target.dtype
        last = computed.last_hidden[b, :n].to("cpu", dtype)
        features = last if self.online.draft_type == "eagle1" else computed.features[b, :n].to("cpu", dtype)
        stats = None if stats is None else tuple(t.cpu() for t in stats)
        size = ids.numel() * ids.element_size() + last.nbytes + (0 if features is last else features.nbytes)
        size += sum(t.nbytes for t in stats) if stats else 0
        if self.bytes + size > self.max_bytes:
            self.full = True  # later rows are computed each time; the kept ones stay
            logger.info("feature cache full at %.2f GB (%d rows); further rows run the target", self.bytes / 1e9,
                        len(self.rows))
            return
        self.rows[row] = (ids.cpu().clone(), features.clone(), last.clone(), stats)
        self.bytes += size

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.online.target.get_output_embeddings()
        return head.weight, head.bias

    def _assemble(self, rows: list[int], batch: dict[str, torch.Tensor]) -> TargetFeatures:
        device = batch["input_ids"].device
        B, T = batch["input_ids"].shape
        kept = [self.rows[row] for row in rows]
        features = torch.zeros(B, T, kept[0][1].shape[-1])  # float32 like the online features, zero-padded
        last = torch.zeros(B, T, kept[0][2].shape[-1])
        for b, (ids, row_features, row_last, _) in enumerate(kept):
            last[b, : len(ids)] = row_last
            features[b, : len(ids)] = row_features
        last = last.to(device)
        features = last if self.online.draft_type == "eagle1" else features.to(device)
        stats = [row_stats for *_, row_stats in kept]
        stats = self._padded(stats, batch) if all(s is not None for s in stats) else {}
        return TargetFeatures(features=features, last_hidden=last, logits=TargetLogits(last, *self._head(), **stats))
