"""EAGLE-3 draft: fused multi-layer features, one decoder layer over [embedding; feature], draft vocab.

Row t reads the fused target features g_t (the hidden states entering layers `aux_layer_ids`,
concatenated, 3H) and the next token x_{t+1}:

    h_t   = fc(g_t)                                          # 3H → H, no bias, once (`project`)
    a_t   = [input_layernorm(embed(x_{t+1})); hidden_norm(h_t)]  # 2H, into q/k/v
    r_t   = h_t + o_proj(attention(a_t))                     # the residual is the feature
    out_t = r_t + mlp(post_attention_layernorm(r_t))         # fed back, un-normed, as the next h_t
    logits_t = lm_head(norm(out_t))                          # [draft_vocab]; target id = id + d2t[id]

EAGLE 3.1 options (DraftConfig; each off by default, and then nothing above changes):

    norm_before_fc:      h_t = fc(input_norm(g_t))           # one RMSNorm over the fused [3H]
    fc_norm:             h_t = fc([fc_norm.i(g_t^i) for each aux layer i])  # one RMSNorm per [H]
    feed_normed_hidden:  the next step's h is norm(out_t)    # the post-norm state, not out_t

`forward` returns the state the next step reads (out_t, or norm(out_t) with feed_normed_hidden) and
`logits` reads that state, so training-time test, the yardstick and decoding, which all carry
`forward`'s output to the next step and score it with `logits`, follow the option unchanged.
These are speculators' / vLLM's Eagle3 `norm_before_fc`, `fc_norm` and `norm_output`: vLLM's
`combine_hidden_states` applies `input_norm` / `fc_norm` before fc, and its model returns the
post-norm hidden state for the logits and, with `norm_output`, for the next step too.

Parameter and buffer names are those SGLang's / vLLM's `LlamaForCausalLMEagle3` read: `fc.weight`
[H, 3H], `midlayer.*` (q/k/v take 2H), `norm.weight`, `lm_head.weight` [Vd, H], `d2t`, `t2d`; and,
only when their option is on, vLLM's `input_norm.weight` [3H] or `fc_norm.{i}.weight` [H].
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from baldeagle.model.draft_config import DraftConfig, to_llama_config
from baldeagle.model.layers import DraftAttention, DraftBase, DraftCache
from baldeagle.model.target_layer import init_layer_from_target
from baldeagle.model.vocab import used_ids_from_d2t


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        hidden = cfg.hidden_size
        self.input_layernorm = LlamaRMSNorm(hidden, eps=cfg.rms_norm_eps)  # on the token embedding
        self.hidden_norm = LlamaRMSNorm(hidden, eps=cfg.rms_norm_eps)  # on the feature
        self.self_attn = DraftAttention(cfg, 2 * hidden)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(to_llama_config(cfg))

    def attention_input(self, embeds, hidden) -> torch.Tensor:
        """embeds [B, T, H], hidden [B, T, H] → [B, T, 2H], what q/k/v read."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def forward(self, embeds, hidden, position_embeddings, cache=None, attention_mask=None) -> torch.Tensor:
        """embeds [B, T, H], hidden [B, T, H] → out [B, T, H] (un-normed)."""
        x = self.attention_input(embeds, hidden)
        x = hidden + self.self_attn(x, position_embeddings, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3Draft(DraftBase):
    frozen_modules = ("embed_tokens",)

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        if cfg.draft_type != "eagle3":
            raise ValueError(f"Eagle3Draft needs an eagle3 config, got {cfg.draft_type!r}")
        self.config = cfg
        hidden = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden)
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * hidden, hidden, bias=False)
        self.midlayer = Eagle3DecoderLayer(cfg)
        self.norm = LlamaRMSNorm(hidden, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, cfg.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(to_llama_config(cfg))
        # target_id = draft_id + d2t[draft_id]; t2d[target_id] is True for the draft vocabulary.
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        if cfg.norm_before_fc:  # EAGLE 3.1 options: modules exist only when on, so older drafts load as before
            self.input_norm = LlamaRMSNorm(len(cfg.aux_layer_ids) * hidden, eps=cfg.rms_norm_eps)
        if cfg.fc_norm:
            self.fc_norm = nn.ModuleList(LlamaRMSNorm(hidden, eps=cfg.rms_norm_eps) for _ in cfg.aux_layer_ids)
        self.freeze_target_copies()

    @classmethod
    def from_target(cls, target_model, cfg: DraftConfig, d2t: torch.Tensor | None = None,
                    init_layer: int | None = None) -> Eagle3Draft:
        """A fresh draft: frozen copy of the target's embedding; LM head = the target's rows of the
        draft vocabulary (trainable); `d2t` from `baldeagle.model.vocab.build_draft_vocab`.
        init_layer: start `midlayer` from this target decoder layer (`baldeagle.model.target_layer`:
        q/k/v's feature half = the target's, embedding half = 0); None = random."""
        if d2t is None:
            raise ValueError("an EAGLE-3 draft needs d2t: build it with baldeagle.model.vocab.build_draft_vocab")
        if d2t.shape != (cfg.draft_vocab_size,):
            raise ValueError(f"d2t has shape {tuple(d2t.shape)}, expected ({cfg.draft_vocab_size},)")
        used = used_ids_from_d2t(d2t)
        if used.min() < 0 or used.max() >= cfg.vocab_size or len(used.unique()) != len(used):
            raise ValueError("d2t does not map the draft vocabulary onto distinct target ids")
        draft = cls(cfg)
        draft.set_draft_vocab(d2t)
        cls.copy_weight(draft.embed_tokens.weight, target_model.get_input_embeddings().weight)
        target_head = target_model.get_output_embeddings().weight  # [V, H]
        cls.copy_weight(draft.lm_head.weight, target_head[used.to(target_head.device)])
        if init_layer is not None:
            init_layer_from_target(draft.midlayer, target_model, init_layer, "eagle3")
        return draft

    def set_draft_vocab(self, d2t: torch.Tensor) -> None:
        used = used_ids_from_d2t(d2t).to(self.d2t.device)
        self.d2t.copy_(d2t)
        self.t2d.zero_()
        self.t2d[used] = True

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Fused aux features [B, T, 3H] → [B, T, H] (applied once, before the first step); with
        norm_before_fc / fc_norm normalised first (over all 3H / per aux layer's H)."""
        x = features.to(self.fc.weight.dtype)
        if self.config.norm_before_fc:
            x = self.input_norm(x)
        if self.config.fc_norm:
            parts = x.chunk(len(self.fc_norm), dim=-1)  # [B, T, H] each, in aux_layer_ids order
            x = torch.cat([norm(part) for norm, part in zip(self.fc_norm, parts)], dim=-1)
        return self.fc(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DraftCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (x_{t+1}), hidden [B, T, H] (projected feature or the previous step's
        state) → the state the next step reads [B, T, H]: out (un-normed), or norm(out) with
        feed_normed_hidden. `logits` takes this state."""
        embeds = self.embed_tokens(input_ids)  # [B, T, H]
        hidden = hidden.to(embeds.dtype)
        out = self.midlayer(embeds, hidden, self.rope(hidden, position_ids), cache, attention_mask)
        return self.norm(out) if self.config.feed_normed_hidden else out

    def keys_values(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The keys and values `forward` would add to a cache for these rows, without the rest of the
        layer → k, v [B, Hkv, T, D]. (Training-time test needs every row's step-0 keys, but runs the
        whole step only on the rows whose outputs are trained.)"""
        embeds = self.embed_tokens(input_ids)
        hidden = hidden.to(embeds.dtype)
        x = self.midlayer.attention_input(embeds, hidden)
        return self.midlayer.self_attn.keys_values(x, self.rope(hidden, position_ids))

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """`forward`'s output [..., H] → [..., Vd] over the draft vocabulary: lm_head(norm(out)) either
        way (with feed_normed_hidden the state is norm(out) already)."""
        return self.lm_head(state if self.config.feed_normed_hidden else self.norm(state))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]
