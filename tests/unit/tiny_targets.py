"""Tiny random Transformers targets built in-process (no files, no network), for unit tests.

Each has hidden 64, 4 heads, 2 KV heads, 6 layers and a 256-token vocabulary, a non-default
RoPE theta, and one of them (Qwen2) linear RoPE scaling, so a draft config that silently falls
back to defaults shows up in the tests.

The mixture-of-experts targets (Qwen3-MoE, Qwen2-MoE) route each token to 2 of 4 experts whose
width (`moe_intermediate_size` 32) differs from the dense width (`intermediate_size` 128, and
Qwen2-MoE's shared expert 96), so a draft config that reads the wrong one shows up; their
`decoder_sparse_step` and `mlp_only_layers` keep the real defaults (every layer sparse).
"""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=6,
    vocab_size=256,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_TARGETS = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(head_dim=24, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        # full attention, as Mistral v0.3 and later (v0.1's sliding window is refused: check_full_attention)
        dict(rms_norm_eps=1e-5, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(head_dim=24, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=96),
    ),
}
MOE_TARGETS = ("qwen3_moe", "qwen2_moe")


def tiny_target(name: str = "llama", seed: int = 0, **overrides):
    """A frozen tiny random target in eval mode (float32, sdpa attention)."""
    config_cls, model_cls, extra = TINY_TARGETS[name]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config.architectures = [model_cls.__name__]  # as a saved checkpoint's config has
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    model.requires_grad_(False)
    return model


def target_outputs(model, input_ids, attention_mask=None):
    """(all hidden states, logits) of one target forward without gradients."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states, out.logits


def tiny_draft(target, draft_type: str = "eagle3", draft_vocab_size: int = 64, seed: int = 0, counts=None,
               init_layer=None, **options):
    """A draft (and its config) for `target`; the EAGLE-3 draft vocab comes from `counts` [V]
    (default: random counts, so about draft_vocab_size / 256 of the target's tokens are covered);
    `init_layer`: its decoder layer starts from that target layer (`init_from_target_layer`);
    `options`: EAGLE 3.1 DraftConfig options (norm_before_fc, fc_norm, feed_normed_hidden)."""
    from baldeagle.model.draft_config import draft_config_from_target
    from baldeagle.model.eagle1 import Eagle1Draft
    from baldeagle.model.eagle3 import Eagle3Draft
    from baldeagle.model.vocab import build_draft_vocab

    cfg = draft_config_from_target(target.config, draft_type, draft_vocab_size=draft_vocab_size, **options)
    torch.manual_seed(seed)
    if draft_type == "eagle1":
        return Eagle1Draft.from_target(target, cfg, init_layer=init_layer), cfg
    if counts is None:
        counts = torch.randint(0, 50, (cfg.vocab_size,))
    d2t, _, _ = build_draft_vocab(counts, cfg.draft_vocab_size)
    return Eagle3Draft.from_target(target, cfg, d2t=d2t, init_layer=init_layer), cfg


def draft_features(hidden_states, cfg):
    """The draft's input features from the target's hidden states: the aux layers, concatenated."""
    return torch.cat([hidden_states[i] for i in cfg.aux_layer_ids], dim=-1)


def random_prompts(count, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):  # random_prompts(n) is a prefix of random_prompts(m > n) for the same seed
        length = int(torch.randint(1, 24, (1,), generator=g))
        out.append(torch.randint(3, vocab, (1, length), generator=g))
    return out


def train_tiny_draft(target, draft_type, steps=300, **options):
    """A briefly trained draft: one-step EAGLE training on the target's own greedy continuations
    (cross-entropy against the target's argmax; EAGLE-3's vocabulary from the data's token counts);
    `options`: EAGLE 3.1 DraftConfig options."""
    from baldeagle.model.draft_config import draft_config_from_target
    from baldeagle.model.eagle1 import Eagle1Draft
    from baldeagle.model.eagle3 import Eagle3Draft
    from baldeagle.model.vocab import build_draft_vocab, target_to_draft_ids

    data = []
    for ids in random_prompts(24, seed=11):
        full = target.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            out = target(full, output_hidden_states=True)
        data.append((full, out.hidden_states, out.logits.argmax(-1)))
    cfg = draft_config_from_target(target.config, draft_type, draft_vocab_size=64, **options)
    torch.manual_seed(0)
    if draft_type == "eagle3":
        counts = torch.bincount(torch.cat([argmax[0] for _, _, argmax in data]), minlength=cfg.vocab_size)
        draft = Eagle3Draft.from_target(target, cfg, d2t=build_draft_vocab(counts, cfg.draft_vocab_size)[0])
    else:
        draft = Eagle1Draft.from_target(target, cfg)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        full, hidden_states, argmax = data[step % len(data)]
        features = torch.cat([hidden_states[i] for i in cfg.aux_layer_ids], dim=-1)
        t = full.shape[1] - 1
        # row i reads x_{i+1} and f_i and predicts the target's choice after x_{i+1}
        out = draft(full[:, 1:], draft.project(features[:, :t]), torch.arange(t)[None])
        logits, labels = draft.logits(out)[0], argmax[0, 1:]
        if draft_type == "eagle3":
            labels = target_to_draft_ids(labels, draft.t2d)
            logits, labels = logits[labels >= 0], labels[labels >= 0]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return draft.eval()
