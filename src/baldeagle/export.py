"""`baldeagle export`: a draft folder → exactly what SGLang, vLLM or a bare `vllm serve` loads.

Formats (the engine contracts, with the source they were read from, are in `export_check`):
- sglang:      EAGLE-1 `LlamaForCausalLMEagle` / EAGLE-3 `LlamaForCausalLMEagle3` with SGLang's
               aux-layer convention in `eagle_config` (id = hidden_states index − 1).
- vllm:        EAGLE-1 `LlamaForCausalLM` (vLLM prefixes "Eagle"; fc.bias folded into the draft's
               own embedding) / EAGLE-3 `LlamaForCausalLMEagle3` with top-level
               `eagle_aux_hidden_state_layer_ids` (id = hidden_states index, as given).
- speculators: EAGLE-3 only; `speculators_model_type: eagle3` + `transformer_layer_config` +
               `speculators_config` naming the verifier, so `vllm serve DIR` needs nothing else.

The aux-layer conventions differ by one between SGLang and vLLM, and vLLM also reads
`eagle_config`: one folder cannot serve both correctly, so each format writes only its own field.
EAGLE 3.1 options (`norm_before_fc`, `fc_norm`, `feed_normed_hidden`): vllm and speculators write
vLLM's flags (`norm_before_fc`, `fc_norm`, `norm_output`) at the top level with the norms' weights
(`input_norm.weight`, `fc_norm.{i}.weight`); SGLang has no such flags, so sglang refuses such a draft.
Every export is validated by `check_export` before it is published (atomically).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
from pathlib import Path

import torch
from safetensors.torch import save_file

from baldeagle.config import ExportConfig
from baldeagle.export_check import (
    ARCHITECTURES,
    EXPORT_INFO,
    LAYER_FIELDS,
    WEIGHTS,
    check_export,
    legacy_rope,
    to_engine_aux_ids,
)
from baldeagle.conventions import check_full_attention, text_config
from baldeagle.export_load import recorded_target
from baldeagle.io import atomic_dir, provenance
from baldeagle.model.checkpoint import load_draft
from baldeagle.model.draft_config import (
    ENGINE_FLAGS,
    NORM_OPTIONS,
    DraftConfig,
    check_fits_target,
)
from baldeagle.targets import target_config_or_none

logger = logging.getLogger(__name__)

FORMATS = ("sglang", "vllm", "speculators")
SPECULATORS_SCHEMA = "0.9.0"  # the speculators release whose config schema this writes


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------


def _check_vocab(draft) -> None:
    """Refuse a draft whose d2t / t2d disagree (engines would emit the wrong target tokens)."""
    d2t, t2d = draft.d2t.long().cpu(), draft.t2d.bool().cpu()
    target = torch.arange(d2t.numel()) + d2t
    vocab = draft.config.vocab_size
    if (target < 0).any() or (target >= vocab).any():
        raise ValueError(f"inconsistent vocab mapping: d2t sends draft ids outside [0, {vocab})")
    if target.unique().numel() != target.numel():
        raise ValueError("inconsistent vocab mapping: d2t maps several draft ids onto the same target id")
    if int(t2d.sum()) != target.numel() or not bool(t2d[target].all()):
        raise ValueError("inconsistent vocab mapping: t2d does not mark exactly the target ids d2t maps to")


def _fold_fc_bias(weight: torch.Tensor, bias: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """vLLM's EAGLE-1 fc has no bias: fc([e; f]) + b = W_e (e + δ) + W_f f with W_e δ = b. Returns e + δ."""
    hidden = embed.shape[1]
    w_e = weight[:, :hidden].double()  # [H, H], the block that multiplies the embedding
    delta = torch.linalg.solve(w_e, bias.double())
    error = float((w_e @ delta - bias.double()).norm() / bias.double().norm().clamp(min=1e-30))
    if not torch.isfinite(delta).all() or error > 1e-6:
        raise ValueError(f"cannot fold fc.bias for vLLM: fc's embedding block is (nearly) singular (error {error:.1e})")
    return (embed.double() + delta).to(embed.dtype)


def exported_tensors(draft, fmt: str, embeddings: bool = False, aux_order: list[int] | None = None) -> dict:
    """The draft's state dict under the names (and in the form) the engine of `fmt` loads."""
    cfg = draft.config
    state = {k: v.detach().cpu() for k, v in draft.state_dict().items()}
    out = {}
    if cfg.draft_type == "eagle3":
        fc = state["fc.weight"]  # [H, 3H]: one column block per aux layer, in aux_layer_ids order
        if aux_order is not None:
            blocks = fc.chunk(len(aux_order), dim=1)
            fc = torch.cat([blocks[i] for i in aux_order], dim=1)
        out["fc.weight"] = fc
        prefix = "layers.0." if fmt == "speculators" else "midlayer."
        out.update({prefix + k[len("midlayer."):]: v for k, v in state.items() if k.startswith("midlayer.")})
        out["norm.weight"], out["lm_head.weight"] = state["norm.weight"], state["lm_head.weight"]
        out.update(_input_norms(state, aux_order or list(range(len(cfg.aux_layer_ids)))))
        if cfg.draft_vocab_size != cfg.vocab_size:  # a full vocabulary needs (and in vLLM allows) no mapping
            out["d2t"], out["t2d"] = state["d2t"].long(), state["t2d"].bool()
        if embeddings:
            out["embed_tokens.weight"] = state["embed_tokens.weight"]
        return out
    out.update({k: v for k, v in state.items() if k.startswith("layers.0.")})
    out["fc.weight"] = state["fc.weight"]
    if fmt == "vllm":
        if bool(state["fc.bias"].any()):
            out["embed_tokens.weight"] = _fold_fc_bias(state["fc.weight"], state["fc.bias"], state["embed_tokens.weight"])
        elif embeddings:
            out["embed_tokens.weight"] = state["embed_tokens.weight"]
    else:
        out["fc.bias"] = state["fc.bias"]
        if embeddings:
            out["embed_tokens.weight"] = state["embed_tokens.weight"]
    return out


def _input_norms(state: dict, aux_order: list[int]) -> dict:
    """EAGLE 3.1's norms before fc, their per-layer parts in the engine's (layer) order as fc's blocks:
    `input_norm.weight` [3H] block j = ours aux_order[j] (an RMS over all 3H ignores the order);
    `fc_norm.{j}.weight` = our fc_norm.{aux_order[j]}."""
    out = {}
    if "input_norm.weight" in state:
        blocks = state["input_norm.weight"].chunk(len(aux_order))
        out["input_norm.weight"] = torch.cat([blocks[i] for i in aux_order])
    for j, i in enumerate(aux_order):
        if f"fc_norm.{i}.weight" in state:
            out[f"fc_norm.{j}.weight"] = state[f"fc_norm.{i}.weight"]
    return out


def engine_flags(cfg: DraftConfig) -> dict[str, bool]:
    """The draft's EAGLE 3.1 options under the speculators / vLLM flag names (`ENGINE_FLAGS`)."""
    return {flag: bool(getattr(cfg, option)) for option, flag in ENGINE_FLAGS.items()}


def _layer_fields(cfg: DraftConfig, dtype: str, max_positions: int) -> dict:
    """LlamaConfig fields of the one-layer draft; RoPE both as Transformers 5 `rope_parameters` and
    as the older `rope_theta` / `rope_scaling` that engines on Transformers 4 read."""
    rope = dict(cfg.rope_parameters)
    theta, scaling = legacy_rope(rope)
    return {
        "model_type": "llama",
        **{name: getattr(cfg, name) for name in LAYER_FIELDS},  # what the engines read, as trained
        "num_hidden_layers": 1,
        "max_position_embeddings": max_positions,
        "mlp_bias": False,
        "tie_word_embeddings": False,  # the engines take embedding/head from the target or the file
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def exported_config(cfg: DraftConfig, fmt: str, dtype: str, max_positions: int, target: str,
                    engine_aux_ids: list[int], num_speculative_tokens: int = 3) -> dict:
    layer = _layer_fields(cfg, dtype, max_positions)
    if cfg.draft_type == "eagle1":
        return {"architectures": [ARCHITECTURES["eagle1", fmt][0]], **layer}
    if fmt == "speculators":
        return {
            "architectures": ["Eagle3DraftModel"],
            "speculators_model_type": "eagle3",
            "speculators_version": SPECULATORS_SCHEMA,
            "transformer_layer_config": layer,
            "draft_vocab_size": cfg.draft_vocab_size,
            "eagle_aux_hidden_state_layer_ids": engine_aux_ids,
            "norm_before_residual": False,  # vLLM assumes True when absent; BaldEagle's residual is un-normed
            **engine_flags(cfg),  # norm_before_fc, fc_norm, norm_output
            "target_hidden_size": None,
            "tie_word_embeddings": False,
            "dtype": dtype,
            "speculators_config": {
                "algorithm": "eagle3",
                "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens,
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "verifier": {"name_or_path": target, "architectures": [cfg.target_architecture or "LlamaForCausalLM"]},
            },
        }
    config = {"architectures": [ARCHITECTURES["eagle3", fmt][0]], **layer, "draft_vocab_size": cfg.draft_vocab_size,
              "norm_before_residual": False}
    if fmt == "sglang":
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": engine_aux_ids, "use_aux_hidden_state": True}
    else:  # vLLM reads fc_norm and norm_output at the top level only (norm_before_fc there too)
        config["eagle_aux_hidden_state_layer_ids"] = engine_aux_ids
        config.update(engine_flags(cfg))
    return config


def _check_request(cfg: DraftConfig, fmt: str, target: str, dtype: str, out: Path, overwrite: bool) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "speculators" and cfg.draft_type != "eagle3":
        raise ValueError("the speculators format holds EAGLE-3 drafts only; export EAGLE-1 as sglang or vllm")
    options = [name for name in NORM_OPTIONS if getattr(cfg, name)]
    if fmt == "sglang" and options:
        raise ValueError(f"the sglang format cannot express {', '.join(options)}: SGLang's LlamaForCausalLMEagle3 has "
                         "no norm before fc and feeds the pre-norm hidden state to the next step, so it would "
                         "draft with another function; export with --format vllm or speculators")
    if not target:
        raise ValueError("the draft records no target model (draft_config.json target_model is empty): "
                         "pass --model with the target it was trained for")
    if dtype and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")


def _target_shape(cfg: DraftConfig, target_config, target: str) -> tuple[int, int | None]:
    """(the target's layer count, its max_position_embeddings or None), checked against the draft."""
    if target_config is None:
        return cfg.target_num_layers, None
    check_full_attention(target_config, f"the target {target}")
    text = text_config(target_config)
    check_fits_target(cfg, text, f"the draft exported for {target}")
    return int(text.num_hidden_layers), int(text.max_position_embeddings)


def _engine_aux(draft, fmt: str, target_layers: int) -> tuple[list[int] | None, list[int]]:
    """EAGLE-3: (the order of fc's column blocks by layer, the aux ids in the engine's convention)."""
    if draft.config.draft_type != "eagle3":
        return None, []
    _check_vocab(draft)
    ids = list(draft.config.aux_layer_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"aux layer ids {ids} repeat a layer: engines capture each layer once")
    if max(ids) >= target_layers:
        raise ValueError(f"aux layer id {max(ids)} is the target's final (normed) output, which no engine "
                         "captures as an aux hidden state")
    aux_order = sorted(range(len(ids)), key=ids.__getitem__)  # engines concatenate in layer order
    return aux_order, to_engine_aux_ids([ids[i] for i in aux_order], "sglang" if fmt == "sglang" else "vllm")


def _export_info(draft, fmt: str, target: str, target_layers: int, target_positions, engine_ids, tensors) -> dict:
    """export_info.json: what the folder holds and the conventions it was written in."""
    cfg = draft.config
    return {
        "format": fmt,
        "draft_type": cfg.draft_type,
        "target_model": target,
        "target_num_layers": target_layers,
        "target_max_position_embeddings": target_positions or cfg.max_position_embeddings,
        "aux_layer_ids_hidden_states": sorted(cfg.aux_layer_ids) if cfg.draft_type == "eagle3" else [],
        "engine_aux_layer_ids": engine_ids,
        "aux_convention": ("sglang: id i = output of layer i = hidden_states[i + 1]" if fmt == "sglang" else
                           "vllm: id i = input of layer i = hidden_states[i]") if engine_ids else "",
        "embeddings_included": "embed_tokens.weight" in tensors,
        "fc_bias_folded_into_embeddings": cfg.draft_type == "eagle1" and fmt == "vllm" and bool(draft.fc.bias.any()),
        "draft_config": dataclasses.asdict(cfg),
        "provenance": provenance(),
    }


def export_draft(draft, out: str | Path, fmt: str, target: str = "", target_config=None, dtype: str = "",
                 embeddings: bool = False, overwrite: bool = False, num_speculative_tokens: int = 3) -> Path:
    """Write `draft` to `out` in format `fmt`; returns the folder. Raises ValueError on refusal."""
    cfg, out = draft.config, Path(out)
    target = target or cfg.target_model
    _check_request(cfg, fmt, target, dtype, out, overwrite)
    target_layers, target_positions = _target_shape(cfg, target_config, target)
    max_positions = max(cfg.max_position_embeddings, target_positions or 0)
    aux_order, engine_ids = _engine_aux(draft, fmt, target_layers)

    tensors = exported_tensors(draft, fmt, embeddings, aux_order)
    weight_dtype = getattr(torch, dtype) if dtype else draft.fc.weight.dtype
    tensors = {k: (v.to(weight_dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    dtype_name = str(weight_dtype).removeprefix("torch.")
    config = exported_config(cfg, fmt, dtype_name, max_positions, target, engine_ids, num_speculative_tokens)
    info = _export_info(draft, fmt, target, target_layers, target_positions, engine_ids, tensors)
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS, (tmp / "config.json").stat().st_mode & 0o777)  # safetensors writes 0600
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(serving_readme(cfg, fmt, out.resolve(), target, num_speculative_tokens))
        problems = check_export(tmp, target_config)
        if problems:  # never publish a folder an engine would reject or misread
            raise ValueError("export failed its own contract check:\n  " + "\n  ".join(problems))
    return out


def serving_readme(cfg: DraftConfig, fmt: str, folder: Path, target: str, k: int) -> str:
    """README.md with the serving commands; every path and name in a shell line is shlex-quoted."""
    kind = "EAGLE-3" if cfg.draft_type == "eagle3" else "EAGLE-1"
    lines = [f"# {kind} draft for {target}", "", f"Exported by BaldEagle in the **{fmt}** format.", ""]
    lines += _sglang_lines(cfg, folder, target, k) if fmt == "sglang" else _vllm_lines(cfg, fmt, folder, target, k)
    lines += ["", f"Check it: `baldeagle export --check {shlex.quote(str(folder))}`.", ""]
    return "\n".join(lines)


def _sglang_lines(cfg: DraftConfig, folder: Path, target: str, k: int) -> list[str]:
    algorithm = "EAGLE3" if cfg.draft_type == "eagle3" else "EAGLE"
    return ["## SGLang", "", "```bash",
            f"python -m sglang.launch_server --model-path {shlex.quote(target)} \\",
            f"    --speculative-algorithm {algorithm} --speculative-draft-model-path {shlex.quote(str(folder))} \\",
            f"    --speculative-num-steps {k} --speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}",
            "```", "",
            "A draft tree (EAGLE-2) instead of a chain: e.g. `--speculative-num-steps 5 --speculative-eagle-topk 8 "
            "--speculative-num-draft-tokens 32`.", "",
            "This folder writes aux-layer ids in SGLang's convention; for vLLM export with `--format vllm`."]


def _vllm_lines(cfg: DraftConfig, fmt: str, folder: Path, target: str, k: int) -> list[str]:
    spec = {"method": "eagle3" if cfg.draft_type == "eagle3" else "eagle", "model": str(folder),
            "num_speculative_tokens": k}
    lines = ["## vLLM", "", "```bash"]
    if fmt == "speculators":
        lines += [f"vllm serve {shlex.quote(str(folder))}", "```", "",
                  "vLLM reads the target (the verifier) and k from config.json. The explicit form:", "", "```bash"]
    lines += [f"vllm serve {shlex.quote(target)} --speculative-config {shlex.quote(json.dumps(spec))}", "```", "",
              "Offline:", "", "```python",
              "from vllm import LLM, SamplingParams",
              f"llm = LLM(model={target!r}, speculative_config={spec!r})",
              "print(llm.generate(['Hello'], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text)",
              "```"]
    if fmt == "vllm":
        lines += ["", "This folder writes aux-layer ids in vLLM's convention; for SGLang export with `--format sglang`."]
    return lines


# ------------------------------------------------------------------------------------------
# Stage
# ------------------------------------------------------------------------------------------


def run_export(cfg: ExportConfig):
    """`baldeagle export`: export a draft, or (`--check DIR`) validate an exported folder."""
    if cfg.check:
        target_config = target_config_or_none(cfg.model or recorded_target(cfg.check))
        if cfg.model and target_config is None:
            logger.warning("%s's config cannot be read offline; checking against %s only", cfg.model, EXPORT_INFO)
        problems = check_export(cfg.check, target_config)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            raise ValueError(f"{cfg.check} does not meet its engine's contract ({len(problems)} problem(s) above)")
        print(f"{cfg.check}: ok")
        return []
    draft = load_draft(cfg.draft)
    target = cfg.model or draft.config.target_model
    path = export_draft(draft, cfg.out, cfg.format, target=target, target_config=target_config_or_none(target),
                        dtype=cfg.dtype, embeddings=cfg.embeddings, overwrite=cfg.overwrite,
                        num_speculative_tokens=cfg.num_speculative_tokens)
    print(f"exported {draft.config.draft_type} draft as {cfg.format} to {path}; serving commands in {path / 'README.md'}",
          flush=True)
    return path

