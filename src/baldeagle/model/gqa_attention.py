"""SDPA attention that lets torch group a GQA target's query heads, for tree verification.

Transformers' `sdpa` attention copies a grouped-query model's keys and values out to every query
head (`repeat_kv`: the whole cache, every layer) whenever a forward queries several tokens under
an explicit mask: exactly what verifying a draft tree is. Torch's SDPA takes the groups itself
(`enable_gqa=True`) and reads each key/value head in place, so that copy goes. Every other forward
(one token, no mask, ALiBi-style position bias, softcapping) keeps Transformers' own path.

Installed per model through Transformers' attention registry (`use_gqa_attention`), with the mask
function of `sdpa`, so masks, caches and every other part of the model stay as Transformers builds them.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "baldeagle_sdpa_gqa"


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """Transformers' attention signature: query [B, Hq, T, D], key/value [B, Hkv, S, D] → ([B, T, Hq, D], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (groups == 1 or query.shape[2] == 1 or attention_mask is None
             or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None)
    if plain:  # nothing to gain, or a case Transformers treats specially
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model) -> bool:
    """Switch a model that runs Transformers' `sdpa` attention to `sdpa_gqa_attention`, in place;
    False (nothing changed) for any other attention implementation."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, sdpa_gqa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
