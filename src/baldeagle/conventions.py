"""Conventions read from a target's Transformers config and tokenizer, each defined once.

Every layer uses these (model/, data/, targets, decode/, train/, export), so this module imports
only torch and `baldeagle.config`, never another baldeagle module.
"""

from __future__ import annotations

import torch

from baldeagle.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, key: str = "target_dtype") -> torch.dtype:
    """The torch dtype of a dtype name from a config; a ConfigError naming `key` for any other name."""
    if name not in DTYPES:
        raise ConfigError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def text_config(config):
    """The text model's part of a Transformers config (a multimodal one holds it inside), or of a
    config.json read as a dict (its `text_config`); a plain causal-LM config as it is."""
    if isinstance(config, dict):
        return config.get("text_config") or config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(config) -> int:
    return int(text_config(config).num_hidden_layers)


def default_aux_layers(layers: int) -> list[int]:
    """EAGLE-3 feature layers: the inputs of layers 2, L//2 and L-3 (`hidden_states[i]`).

    Below 7 layers those repeat a layer (L = 6: [2, 3, 3]), which engines cannot capture (each
    layer is captured once), so a shallow target takes 1, L//2 and L-1 instead (L = 6: [1, 3, 5]);
    a target of fewer than 4 layers has no three distinct inner layers to offer."""
    if layers >= 7:
        return [2, layers // 2, layers - 3]
    if layers >= 4:
        return [1, layers // 2, layers - 1]
    raise ValueError(f"an EAGLE-3 draft fuses three distinct inner layers of the target; a target of {layers} "
                     "layers has too few (set aux_layer_ids, or use an EAGLE-1 draft)")


def rope_parameters(config) -> dict:
    """The RoPE a Transformers-5 reader builds from a (text) config or a config dict: its
    `rope_parameters` (the full-attention entry where each layer type has its own, e.g. Gemma 3),
    else one made from the older `rope_theta` / `rope_scaling` (`type` renamed `rope_type`)."""
    if isinstance(config, dict):
        get = config.get
    else:
        def get(key, default=None):
            return getattr(config, key, default)
    rope = get("rope_parameters")
    if not rope:
        rope = dict(get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = float(get("rope_theta", 10000.0))
    elif "full_attention" in rope:
        rope = rope["full_attention"]
    return dict(rope)


def pad_token_id(declared: int | None, stop_ids: tuple[int, ...] | list[int] = ()) -> int:
    """The id that pads a batch: the declared pad id (the tokenizer's `pad_token_id`, or the target
    config's where no tokenizer is loaded); without one, the first stop token (the target's EOS,
    `targets.stop_token_ids`); with neither, 0. Padding is always masked out, so the id only has to
    be a real token of the vocabulary."""
    if declared is not None:
        return int(declared)
    return int(stop_ids[0]) if stop_ids else 0


class UnsupportedTargetError(ConfigError):
    """A target whose attention BaldEagle's drafts and decoding do not implement."""


def unsupported_attention(config) -> dict[str, list[int]]:
    """{layer type: layer indices} of the target's layers that are not full attention, as
    Transformers decides them from the config (`layer_types`, `sliding_window`): the cache it would
    build for the target holds a plain layer only for full attention. {} for a full-attention target."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = DynamicCache(config=config).layers
    names = getattr(text_config(config), "layer_types", None) or [type(layer).__name__ for layer in layers]
    found: dict[str, list[int]] = {}
    for index, (name, layer) in enumerate(zip(names, layers)):
        if type(layer) is not DynamicLayer:
            found.setdefault(str(name), []).append(index)
    return found


def check_full_attention(config, who: str) -> None:
    """Refuse, before any work, a target with sliding-window or linear-attention layers, naming them."""
    found = unsupported_attention(config)
    if found:
        kinds = "; ".join(f"{name} in layers {layers}" for name, layers in found.items())
        raise UnsupportedTargetError(
            f"{who} has layers that are not full attention ({kinds}): BaldEagle's drafts and speculative "
            "decoding support full-attention targets only")
