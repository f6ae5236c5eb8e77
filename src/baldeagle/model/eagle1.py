"""EAGLE-1 draft (EAGLE-2 uses the same weights; only decoding differs).

Row t reads the target's feature f_t (its last hidden state after the final norm, the LM head's
input, `hidden_states[-1]`) and the next token x_{t+1}:

    x_t   = fc([embed(x_{t+1}); f_t])            # 2H → H, with bias
    out_t = decoder layer without input norm (x_t)  # ≈ f_{t+1}; no final norm
    logits_t = lm_head(out_t)                     # the target's own (frozen) LM head

The state_dict is what SGLang's `LlamaForCausalLMEagle` reads: `fc.weight`, `fc.bias`,
`layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.post_attention_layernorm.weight`,
`layers.0.mlp.{gate,up,down}_proj.weight`, plus the frozen `embed_tokens.weight`/`lm_head.weight`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from baldeagle.model.draft_config import DraftConfig, to_llama_config
from baldeagle.model.layers import DraftAttention, DraftBase, DraftCache
from baldeagle.model.target_layer import init_layer_from_target


class Eagle1DecoderLayer(nn.Module):
    """A Llama decoder layer whose input norm is removed (the fc output goes straight into attention)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg, cfg.hidden_size)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = LlamaMLP(to_llama_config(cfg))

    def forward(self, x, position_embeddings, cache=None, attention_mask=None) -> torch.Tensor:
        """x [B, T, H] → [B, T, H]."""
        x = x + self.self_attn(x, position_embeddings, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle1Draft(DraftBase):
    frozen_modules = ("embed_tokens", "lm_head")

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        if cfg.draft_type != "eagle1":
            raise ValueError(f"Eagle1Draft needs an eagle1 config, got {cfg.draft_type!r}")
        self.config = cfg
        hidden = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden)
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layers = nn.ModuleList([Eagle1DecoderLayer(cfg)])
        self.lm_head = nn.Linear(hidden, cfg.vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(to_llama_config(cfg))
        self.freeze_target_copies()

    @classmethod
    def from_target(cls, target_model, cfg: DraftConfig, d2t: torch.Tensor | None = None,
                    init_layer: int | None = None) -> Eagle1Draft:
        """A fresh draft whose embedding and LM head are frozen copies of the target's (`d2t` unused).
        init_layer: start `layers[0]` from this target decoder layer (`baldeagle.model.target_layer`:
        its weights as they are, less the input norm the draft layer lacks); None = random."""
        draft = cls(cfg)
        cls.copy_weight(draft.embed_tokens.weight, target_model.get_input_embeddings().weight)
        cls.copy_weight(draft.lm_head.weight, target_model.get_output_embeddings().weight)
        if init_layer is not None:
            init_layer_from_target(draft.layers[0], target_model, init_layer, "eagle1")
        return draft

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """EAGLE-1 features are already the target's last hidden state: [B, T, H] → [B, T, H]."""
        return features

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DraftCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] (x_{t+1}), hidden [B, T, H] (f_t), position_ids [B, T] → out [B, T, H] (≈ f_{t+1})."""
        embeds = self.embed_tokens(input_ids)  # [B, T, H]
        x = self.fc(torch.cat([embeds, hidden.to(embeds.dtype)], dim=-1))  # [B, T, 2H] → [B, T, H]
        return self.layers[0](x, self.rope(x, position_ids), cache, attention_mask)

    def keys_values(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The keys and values `forward` would add to a cache for these rows → k, v [B, Hkv, T, D]."""
        x = self.fc(torch.cat([self.embed_tokens(input_ids), hidden.to(self.fc.weight.dtype)], dim=-1))
        return self.layers[0].self_attn.keys_values(x, self.rope(x, position_ids))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """[..., H] → [..., V] with the target's LM head (no final norm)."""
        return self.lm_head(out)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids
