"""Pieces shared by the EAGLE-1 and EAGLE-3 drafts: KV cache, attention, frozen-copy helpers.

Notation: B batch, T new tokens, S cached + new keys, H hidden size, Hq query heads, Hkv KV
heads, D head dim. A draft has exactly one decoder layer, so its cache is one (k, v) pair.

Attention masks accepted by the drafts' `forward` (`attention_mask`):
- None: causal over the new tokens, full over the cache;
- [B, S] (1 = real token): key padding, combined with the rule above;
- [B, 1, T, S]: bool (True = attend) or additive float, used as given (tree decoding).
Anything that holds keys can stand in for the cache: it only needs `attend(q, k, v, mask)`
(training-time test uses this, see `baldeagle.train.ttt.TTTCache`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (True = attend) → additive float. A finite minimum keeps fully masked rows NaN-free."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def build_mask(attention_mask: torch.Tensor | None, q_len: int, past: int, device) -> torch.Tensor:
    """The bool mask [B|1, 1, T, S] (True = attend) for T new queries after `past` cached keys."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    rows = torch.arange(q_len, device=device)[:, None] + past  # shape: [T, 1]
    cols = torch.arange(past + q_len, device=device)[None, :]  # shape: [1, S]
    mask = (cols <= rows)[None, None]  # shape: [1, 1, T, S]
    if attention_mask is not None:  # key padding [B, S]
        mask = mask & attention_mask.bool()[:, None, None, :]
    return mask


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, heads, T, D] with (cos, sin) [B, T, D]: Transformers' `apply_rotary_pos_emb`, one tensor."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B|1, 1, T, S] or None (plain causal) → [B, Hq, T, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(mask, q.dtype))


class DraftCache:
    """Keys and values of the draft's single layer, `k`/`v` of shape [B, Hkv, S, D]."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None):
        self.k, self.v = k, v

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add T new entries [B, Hkv, T, D]; return all entries [B, Hkv, S, D]."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, n: int) -> None:
        """Keep the first n entries."""
        if self.k is not None:
            self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]

    def select(self, index: torch.Tensor) -> None:
        """Keep the entries at `index` ([S'] for every row, or [B, S']), in that order (tree paths)."""
        if self.k is None:
            return
        if index.dim() == 1:
            self.k, self.v = self.k[:, :, index], self.v[:, :, index]
            return
        gather = index[:, None, :, None].expand(-1, self.k.shape[1], -1, self.k.shape[3])
        self.k, self.v = self.k.gather(2, gather), self.v.gather(2, gather)

    def attend(self, q, k, v, attention_mask=None) -> torch.Tensor:
        """Append the new k/v, then attend from q [B, Hq, T, D] to cache + new → [B, Hq, T, D]."""
        past = len(self)
        k_all, v_all = self.append(k, v)
        if past == 0 and attention_mask is None:  # a prefill: plain causal, no [T, T] mask built (long prompts)
            return sdpa_attention(q, k_all, v_all, None)
        return sdpa_attention(q, k_all, v_all, build_mask(attention_mask, q.shape[2], past, q.device))


class DraftAttention(nn.Module):
    """Multi-head attention with GQA and RoPE; q/k/v read `input_size` features (H, or 2H for EAGLE-3)."""

    def __init__(self, cfg, input_size: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias  # Llama semantics: q, k, v and o alike
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def keys_values(self, x, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, input_size], (cos, sin) [B, T, D] → the keys (with RoPE) and values [B, Hkv, T, D]."""
        batch, length, _ = x.shape
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, *position_embeddings), v

    def forward(self, x, position_embeddings, cache=None, attention_mask=None) -> torch.Tensor:
        """x [B, T, input_size], (cos, sin) [B, T, D] → [B, T, H]."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        q = apply_rope(q, *position_embeddings)
        k, v = self.keys_values(x, position_embeddings)  # [B, Hkv, T, D]
        if cache is not None:
            out = cache.attend(q, k, v, attention_mask)
        elif attention_mask is None:
            out = sdpa_attention(q, k, v, None)
        else:
            out = sdpa_attention(q, k, v, build_mask(attention_mask, length, 0, x.device))
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DraftBase(nn.Module):
    """What both drafts share: which parameters are frozen copies of the target's, and how to copy them."""

    frozen_modules: tuple[str, ...] = ("embed_tokens",)

    def freeze_target_copies(self) -> None:
        for name in self.frozen_modules:
            getattr(self, name).requires_grad_(False)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name → parameter for everything the optimiser updates (all but the target's frozen copies)."""
        frozen = tuple(name + "." for name in self.frozen_modules)
        return {n: p for n, p in self.named_parameters() if not n.startswith(frozen)}

    def rope(self, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) [B, T, D] for `position_ids` [B, T]."""
        return self.rotary_emb(x, position_ids)

    @staticmethod
    def copy_weight(destination: nn.Parameter, source: torch.Tensor) -> None:
        if destination.shape != source.shape:
            raise ValueError(
                f"shape mismatch copying from the target: {tuple(source.shape)} → {tuple(destination.shape)}"
            )
        with torch.no_grad():
            destination.copy_(source)
