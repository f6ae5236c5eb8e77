"""Back into BaldEagle: an exported folder (any engine format) → a draft computing the same logits.

`load_exported` reads what `export` writes and what the engines load (speculators checkpoints too),
through the same name and flag tables as the exporter and `export --check` (`export_check`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from baldeagle.conventions import default_aux_layers
from baldeagle.conventions import rope_parameters as rope_of
from baldeagle.export_check import (
    EXPORT_INFO,
    WEIGHTS,
    check_norm_flags,
    describe,
    engine_norm_flags,
    from_engine_aux_ids,
    read_folder,
)
from baldeagle.model.checkpoint import build_draft
from baldeagle.model.draft_config import ENGINE_FLAGS, DraftConfig
from baldeagle.targets import target_config_or_none


def load_exported(folder: str | Path, target=None, device: str | torch.device = "cpu"):
    """An exported folder (any format) → a BaldEagle draft computing the same logits.

    `target`: the target model (or its name) to take the embedding and, for EAGLE-1, the LM head
    from when the folder does not hold them; by default the target recorded in the folder.
    """
    folder = Path(folder)
    config, info, _ = read_folder(folder)
    described = describe(config, info)
    kind = described["kind"]
    if kind not in ("eagle1", "eagle3"):
        raise ValueError(f"{folder} holds no EAGLE draft an engine loads")
    _refuse_other_layouts(folder, config, kind, described["format"])
    target_name = info.get("target_model") or ((config.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path", "")
    layers = info.get("target_num_layers") or _target_layers(folder, target, target_name)
    engine_ids = described["aux_ids"]
    aux = (from_engine_aux_ids(engine_ids, described["convention"]) if engine_ids else default_aux_layers(layers)) \
        if kind == "eagle3" else [layers]
    cfg = _loaded_config(kind, described["layer"], config, info.get("draft_config", {}), aux, layers, target_name)
    if kind == "eagle3":  # the EAGLE 3.1 options as the folder's engine reads them
        flags = engine_norm_flags(config, described["format"])
        cfg = dataclasses.replace(cfg, **{option: flags[flag] for option, flag in ENGINE_FLAGS.items()})
    state = load_file(str(folder / WEIGHTS))
    state = {("midlayer." + k[len("layers.0."):] if kind == "eagle3" and k.startswith("layers.0.") else k): v
             for k, v in state.items()}
    _complete_state(state, cfg, (target or target_name) if target is None or isinstance(target, str) else target)
    draft = build_draft(cfg)
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:  # e.g. a flag that says norm_before_fc without its input_norm.weight
        raise ValueError(f"{folder}: the tensors do not fit the draft its config describes: missing {missing}, "
                         f"unexpected {unexpected}")
    draft.freeze_target_copies()
    return draft.to(device=device, dtype=state["fc.weight"].dtype)


def _target_layers(folder: Path, target, target_name: str) -> int:
    """The target's layer count from the target given (a model or a name) or the one recorded."""
    target_config = getattr(target, "config", None) or target_config_or_none(target if isinstance(target, str) else target_name)
    if target_config is None:
        raise ValueError(f"{folder}: the target's layer count is unknown; pass the target")
    return target_config.get_text_config().num_hidden_layers


def _loaded_config(kind: str, layer: dict, config: dict, recorded: dict, aux, layers, target_name: str) -> DraftConfig:
    """The DraftConfig of an exported folder: its layer fields, the draft vocab, the target's shape."""
    vocab = int(layer["vocab_size"])
    return DraftConfig(
        draft_type=kind, hidden_size=int(layer["hidden_size"]), intermediate_size=int(layer["intermediate_size"]),
        num_attention_heads=int(layer["num_attention_heads"]), num_key_value_heads=int(layer["num_key_value_heads"]),
        head_dim=int(layer.get("head_dim") or layer["hidden_size"] // layer["num_attention_heads"]),
        rms_norm_eps=float(layer["rms_norm_eps"]), rope_parameters=rope_of(layer),
        max_position_embeddings=int(layer["max_position_embeddings"]), vocab_size=vocab,
        draft_vocab_size=int(layer.get("draft_vocab_size") or config.get("draft_vocab_size") or vocab),
        aux_layer_ids=aux, target_num_layers=int(layers), hidden_act=layer.get("hidden_act", "silu"),
        attention_bias=bool(layer.get("attention_bias", False)),
        tie_word_embeddings=bool(recorded.get("tie_word_embeddings", False)),
        pad_token_id=layer.get("pad_token_id"), bos_token_id=layer.get("bos_token_id"),
        eos_token_id=layer.get("eos_token_id"),
        torch_dtype=str(layer.get("torch_dtype") or config.get("dtype") or "float32"),
        target_model=target_name, target_architecture=recorded.get("target_architecture", ""),
    )


def _complete_state(state: dict, cfg: DraftConfig, target) -> None:
    """Add in place what an engine's folder may leave out: the identity vocab mapping, vLLM's folded
    fc.bias (zero), and the embedding (and EAGLE-1's LM head) from `target` (a model or a name)."""
    kind, dtype = cfg.draft_type, state["fc.weight"].dtype
    if kind == "eagle3" and "d2t" not in state:  # full vocabulary: the identity mapping
        state["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
    if kind == "eagle3" and "t2d" not in state:
        state["t2d"] = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        state["t2d"][torch.arange(cfg.draft_vocab_size) + state["d2t"]] = True
    if kind == "eagle1" and "fc.bias" not in state:  # vLLM: folded into the embedding
        state["fc.bias"] = torch.zeros(cfg.hidden_size, dtype=dtype)
    needs = ["embed_tokens.weight"] + (["lm_head.weight"] if kind == "eagle1" else [])
    if all(name in state for name in needs):
        return
    if isinstance(target, str):
        from baldeagle.targets import load_target

        target = load_target(target)
    if "embed_tokens.weight" not in state:
        state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().to("cpu", dtype)
    if kind == "eagle1" and "lm_head.weight" not in state:
        state["lm_head.weight"] = target.get_output_embeddings().weight.detach().to("cpu", dtype)


def _refuse_other_layouts(folder: Path, config: dict, kind: str, fmt: str) -> None:
    """Layout flags that describe another draft than any BaldEagle builds (which would load without
    error and compute other logits): speculators' norm_before_residual (vLLM reads an absent one as
    true), both input norms at once, and EAGLE 3.1 flags in an SGLang folder (SGLang ignores them).
    norm_before_fc, fc_norm and norm_output alone are BaldEagle's own options."""
    problems = check_norm_flags(config, fmt) if kind == "eagle3" else []
    if "speculators_config" in config and config.get("norm_before_residual", True) is not False:
        problems.insert(0, "speculators flag norm_before_residual is not false: the residual would be the normed "
                           "feature, a draft layer BaldEagle's EAGLE-3 does not implement")
    if problems:
        raise ValueError(f"{folder}: {'; '.join(problems)}; loading it would compute other logits")


def recorded_target(folder: str | Path) -> str:
    """The target an exported folder names (BaldEagle's record, or the speculators verifier), or ""."""
    folder = Path(folder)
    try:
        if (folder / EXPORT_INFO).is_file():
            return json.loads((folder / EXPORT_INFO).read_text()).get("target_model", "")
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    return ((config.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path") or ""
