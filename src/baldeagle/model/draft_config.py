"""The rules by which a draft's config follows its target, in one place.

A draft is one Llama-style decoder layer. Everything that must match the target for the draft's
features, tokens and positions to line up is copied from the target's config: hidden size,
heads, KV heads, head dim, RoPE (theta, type and scaling, as Transformers' `rope_parameters`),
RMS eps, `max_position_embeddings` (an engine stops drafting past it), activation and attention
bias. Choices the target's family makes that a draft does not copy:

- Qwen3's q/k RMS norms: the draft has none (the EAGLE-3 layer engines serve is a Llama layer).
- Sliding-window or linear-attention layers (Mistral v0.1, Gemma 2/3, Qwen2 with its window on):
  refused before any work by `conventions.check_full_attention` (train, features, eval, score, export).
- `attention_bias` keeps Llama's meaning (q, k, v and o projections all biased), so an exported
  draft loads into the engines' Llama-based EAGLE models; a Qwen2 target (q/k/v bias) sets it,
  and so does a Qwen2-MoE target unless its config turns `qkv_bias` off.
- Mixture-of-experts layers (Qwen2/Qwen3-MoE, Mixtral, ...): the draft's layer is dense, and its
  MLP width is the target's `intermediate_size`, the width the family gives a dense layer (Qwen3-MoE's
  `mlp_only_layers`, Qwen2-MoE's shared expert, DeepSeek's first dense layers), not
  `moe_intermediate_size`, the width of one expert (768 against 6144 in Qwen3-30B-A3B: an eighth
  of the capacity a draft of the same hidden size gets from a dense target). vLLM's and SGLang's
  EAGLE-3 Llama drafts build their MLP from the draft config's `intermediate_size`, so an export
  carries this value. The router is not the draft's concern: features are the hidden states
  entering the aux layers (`hidden_states[i]`), which a MoE target returns like a dense one, and
  its router logits are never read (`baldeagle.data.features`).

EAGLE 3.1 options (EAGLE-3 only, all off by default; the draft's own choices, not the target's):
`norm_before_fc`, `fc_norm` and `feed_normed_hidden` (see `baldeagle.model.eagle3`). Each is one
flag of the speculators / vLLM Eagle3 config (`ENGINE_FLAGS`), which is what an export writes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from baldeagle.conventions import default_aux_layers, rope_parameters, text_config

CONFIG_NAME = "draft_config.json"
DRAFT_TYPES = ("eagle1", "eagle3")
QKV_BIAS_FAMILIES = ("qwen2", "qwen2_moe")  # families whose q/k/v projections carry a bias


@dataclass
class DraftConfig:
    draft_type: str  # "eagle1" | "eagle3"
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: dict  # the target's, e.g. {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, ...}
    max_position_embeddings: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int  # eagle3: reduced vocabulary; eagle1: = vocab_size
    # Transformers `hidden_states[i]` indices (the input of layer i; L = the final normed output).
    # eagle3: three ids, concatenated into fc's 3H input; eagle1: [L], the LM head's input.
    aux_layer_ids: list[int]
    target_num_layers: int
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"  # the target's dtype, as a string ("bfloat16", ...)
    target_model: str = ""  # name_or_path of the target
    target_architecture: str = ""  # e.g. "LlamaForCausalLM"
    # EAGLE 3.1 (eagle3 only): RMSNorm on the fused [3H] features before fc, or one RMSNorm per aux
    # layer's [H] feature (EAGLE 3.1's "FC normalisation"); and the next step reads norm(out), the
    # final norm's output, instead of out. Absent from older draft_config.json files: off.
    norm_before_fc: bool = False
    fc_norm: bool = False
    feed_normed_hidden: bool = False


# DraftConfig option → the speculators / vLLM Eagle3 config flag that describes the same computation
# (speculators `models/eagle3/core.py`, vLLM `model_executor/models/llama_eagle3.py`).
ENGINE_FLAGS = {"norm_before_fc": "norm_before_fc", "fc_norm": "fc_norm", "feed_normed_hidden": "norm_output"}
NORM_OPTIONS = tuple(ENGINE_FLAGS)


def check_norm_options(draft_type: str, options: dict) -> None:
    """options: {DraftConfig option: bool}. EAGLE-1 has none of them; the two input norms exclude
    each other (speculators refuses the pair, and BaldEagle implements one norm before fc at most)."""
    chosen = [name for name in NORM_OPTIONS if options.get(name)]
    if chosen and draft_type != "eagle3":
        raise ValueError(f"draft_type={draft_type} does not support {', '.join(chosen)} (an EAGLE-3 option)")
    if options.get("norm_before_fc") and options.get("fc_norm"):
        raise ValueError("norm_before_fc and fc_norm exclude each other: one norm over the fused features, "
                         "or one per aux layer")


def _dtype_name(text) -> str:
    name = "dtype" if hasattr(text, "dtype") else "torch_dtype"  # transformers 5 / 4
    dtype = getattr(text, name, None)
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


def _attention_bias(text) -> bool:
    if getattr(text, "qkv_bias", None) is not None:  # Qwen2-MoE says so in its config
        return bool(text.qkv_bias)
    if getattr(text, "model_type", "") in QKV_BIAS_FAMILIES:
        return True
    return bool(getattr(text, "attention_bias", False))


def dense_intermediate_size(text) -> int:
    """The draft MLP's width: the target's dense `intermediate_size` (MoE targets too; see the module notes)."""
    size = getattr(text, "intermediate_size", None)
    if size is None:
        raise ValueError(f"the target's config ({getattr(text, 'model_type', 'unknown')}) has no intermediate_size "
                         "to size the draft's MLP with")
    return int(size)


def check_aux_layer_ids(aux_layer_ids: list[int], num_layers: int, draft_type: str) -> list[int]:
    ids = [int(i) for i in aux_layer_ids]
    for i in ids:
        if not 0 <= i <= num_layers:
            raise ValueError(
                f"aux layer id {i} is out of range: the target has L={num_layers} layers, so ids "
                f"index hidden_states[0..{num_layers}]"
            )
    expected = 3 if draft_type == "eagle3" else 1
    if len(ids) != expected:
        raise ValueError(f"{draft_type} needs {expected} aux layer id(s), got {ids}")
    return ids


def draft_config_from_target(
    target_config, draft_type: str, draft_vocab_size: int = 32000, aux_layer_ids: list[int] | None = None,
    **norm_options: bool,
) -> DraftConfig:
    """A draft config that follows `target_config` (a Transformers config of a causal LM);
    `norm_options`: the EAGLE 3.1 options (`NORM_OPTIONS`), off when not given."""
    if draft_type not in DRAFT_TYPES:
        raise ValueError(f"draft_type must be one of {DRAFT_TYPES}, got {draft_type!r}")
    unknown = sorted(set(norm_options) - set(NORM_OPTIONS))
    if unknown:
        raise TypeError(f"unknown draft option(s) {unknown}; known: {list(NORM_OPTIONS)}")
    check_norm_options(draft_type, norm_options)
    text = text_config(target_config)
    layers = int(text.num_hidden_layers)
    vocab = int(text.vocab_size)
    if aux_layer_ids is None:
        aux_layer_ids = default_aux_layers(layers) if draft_type == "eagle3" else [layers]
    architectures = getattr(target_config, "architectures", None) or []
    return DraftConfig(
        draft_type=draft_type,
        hidden_size=int(text.hidden_size),
        intermediate_size=dense_intermediate_size(text),
        num_attention_heads=int(text.num_attention_heads),
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        rms_norm_eps=float(text.rms_norm_eps),
        rope_parameters=rope_parameters(text),
        max_position_embeddings=int(text.max_position_embeddings),
        vocab_size=vocab,
        draft_vocab_size=min(int(draft_vocab_size), vocab) if draft_type == "eagle3" else vocab,
        aux_layer_ids=check_aux_layer_ids(aux_layer_ids, layers, draft_type),
        target_num_layers=layers,
        hidden_act=str(getattr(text, "hidden_act", "silu")),
        attention_bias=_attention_bias(text),
        tie_word_embeddings=bool(getattr(target_config, "tie_word_embeddings", False)),
        pad_token_id=getattr(text, "pad_token_id", None),
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        torch_dtype=_dtype_name(text),
        target_model=str(getattr(target_config, "_name_or_path", "") or getattr(target_config, "name_or_path", "")),
        target_architecture=str(architectures[0]) if architectures else "",
        **{name: bool(value) for name, value in norm_options.items()},
    )


def to_llama_config(cfg: DraftConfig):
    """A one-layer `transformers.LlamaConfig` describing the draft's decoder layer (and export)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        hidden_act=cfg.hidden_act,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters),
        max_position_embeddings=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        attention_bias=cfg.attention_bias,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        dtype=getattr(torch, cfg.torch_dtype, torch.float32),
    )


# What a draft reads from its target and cannot adapt to: (what, draft config field, target config field).
FOLLOWED_SIZES = (("hidden size", "hidden_size", "hidden_size"), ("vocabulary", "vocab_size", "vocab_size"),
                  ("layer count", "target_num_layers", "num_hidden_layers"))


def check_fits_target(cfg: DraftConfig, target_config, where: str) -> None:
    """One clear error when the draft `cfg` (from `where`) was made for another target.

    target_config: a Transformers config, or a config.json as a dict."""
    text = text_config(target_config)
    value = text.get if isinstance(text, dict) else lambda key: getattr(text, key, None)  # noqa: E731
    for what, ours, theirs in FOLLOWED_SIZES:
        if value(theirs) is not None and getattr(cfg, ours) != value(theirs):
            raise ValueError(f"{where} was made for another target: {what} {getattr(cfg, ours)}, "
                             f"this target has {value(theirs)}")


def save(cfg: DraftConfig, folder: str | Path) -> Path:
    path = Path(folder) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")
    return path


def load(folder: str | Path) -> DraftConfig:
    path = Path(folder)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no draft config at {path}")
    data = json.loads(path.read_text())
    fields = {f.name: f for f in dataclasses.fields(DraftConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown draft config key(s) {unknown}")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
    if missing:
        raise ValueError(f"{path}: missing draft config key(s) {missing}")
    if data["draft_type"] not in DRAFT_TYPES:
        raise ValueError(f"{path}: draft_type must be one of {DRAFT_TYPES}, got {data['draft_type']!r}")
    try:
        check_norm_options(data["draft_type"], data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return DraftConfig(**data)
