"""`baldeagle prepare`: conversations → token ids + a loss mask of the assistant's tokens (and the
user's with `train_user_turns`), saved as Arrow.

Output folder (written atomically; it appears only when complete):
- a `datasets` Arrow dataset (`save_to_disk`) with exactly two columns, `input_ids` (int32) and
  `loss_mask` (int8, 0/1, same length);
- `stats.json`: rows in/kept, tokens, trained tokens, rows skipped by reason, the model, the
  tokenizer and chat template used, provenance;
- `config.yaml`: the resolved configuration.

Rows that cannot be trained are skipped and counted by reason (see `REASONS`); with `strict`
the first one stops the run with an error naming the row. Rows longer than `max_length` tokens
are truncated to their first `max_length` tokens (a turn cut in the middle keeps its first part)
and counted (`rows_truncated`); a row with no trained token left is skipped as `too_long`.
`load_prepared` is how later stages (the trainer) read the result back.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from baldeagle.config import write_resolved
from baldeagle.data import sources, template
from baldeagle.errors import BaldEagleError
from baldeagle.io import atomic_dir, atomic_write_json, ensure_writable, provenance, read_json
from baldeagle.targets import load_tokenizer

REASONS = (
    "no_assistant_turn", "empty_content", "unknown_role", "non_string_content",
    "consecutive_same_role", "too_long", "template_error", sources.MALFORMED,
)
OUTPUT_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "loss_mask": datasets.List(datasets.Value("int8")),
        "skip": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
    }
)
SMALL_DATASET = 1000  # rows below which one process is faster than starting several


class PrepareError(BaldEagleError):
    """A row that cannot be prepared (under --strict), or a run that produced nothing."""


def check_conversation(messages: list[dict]) -> tuple[str, str] | None:
    """(reason, detail) why a canonical conversation cannot be trained, or None if it can."""
    for k, message in enumerate(messages):
        if not isinstance(message["content"], str):
            return "non_string_content", f"message {k} has no text content"
    for k, message in enumerate(messages):
        if message["role"] not in template.ROLES:
            return "unknown_role", f"message {k} has role {message['role']!r}"
    for k, message in enumerate(messages):
        if not message["content"].strip():
            return "empty_content", f"message {k} ({message['role']}) is empty"
    for k in range(1, len(messages)):
        if messages[k]["role"] == messages[k - 1]["role"]:
            return "consecutive_same_role", f"messages {k - 1} and {k} are both {messages[k]['role']}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn", "the conversation has no assistant message"
    return None


def encode_row(messages: list[dict], tokenizer, max_length: int,
               roles: tuple[str, ...] = ("assistant",)) -> tuple[list[int], list[int], str, str, bool]:
    """(input_ids, loss_mask, skip reason or "", detail, truncated) for one canonical conversation;
    the mask marks the turns of `roles`."""
    problem = check_conversation(messages)
    if problem:
        return [], [], *problem, False
    try:
        ids, mask, total = template.tokenize_row(tokenizer, messages, max_length, roles)
    except template.TemplateError as error:
        return [], [], "template_error", str(error), False
    if not any(mask):
        return [], [], "too_long", f"no trained token within the first {max_length} of its {total} tokens", False
    return ids, mask, "", "", total > len(ids)


def _encoder(tokenizer, max_length: int, strict: bool, roles: tuple[str, ...]):
    """The `Dataset.map` function: one row → input_ids, loss_mask, skip."""

    def encode(row: dict, index: int) -> dict:
        if row.get("skip"):  # the source could not read this row (a malformed line): "reason: detail"
            ids, mask, (reason, _, detail), truncated = [], [], row["skip"].partition(": "), False
        else:
            ids, mask, reason, detail, truncated = encode_row(row["messages"], tokenizer, max_length, roles)
        if reason and strict:  # name the row as the source numbers it, when it says
            raise PrepareError(f"row {row.get('row', index)}: {reason}: {detail}")
        return {"input_ids": ids, "loss_mask": mask, "skip": reason, "truncated": truncated}

    return encode


def worker_count(requested: int, rows: int) -> int:
    """Processes for `map`: 0 means all cores; small datasets use one."""
    count = requested or os.cpu_count() or 1
    if rows < SMALL_DATASET:
        return 1
    return max(1, min(count, rows))


def tokenise(conversations: datasets.Dataset, tokenizer, max_length: int, strict: bool, num_proc: int,
             roles: tuple[str, ...] = ("assistant",)):
    """(kept rows with input_ids and loss_mask, {reason: count} over all REASONS, kept rows truncated);
    the mask marks the turns of `roles`."""
    procs = worker_count(num_proc, len(conversations))
    encoded = conversations.map(
        _encoder(tokenizer, max_length, strict, roles), with_indices=True, remove_columns=conversations.column_names,
        features=OUTPUT_FEATURES, num_proc=procs if procs > 1 else None, load_from_cache_file=False,
        desc="Tokenising",
    )
    counts = Counter(encoded["skip"])
    skipped = {reason: counts.get(reason, 0) for reason in REASONS}
    kept = encoded.filter(lambda skips: [s == "" for s in skips], input_columns="skip", batched=True)
    truncated = int(pc.sum(kept.with_format("arrow")["truncated"]).as_py() or 0)
    return kept.remove_columns(["skip", "truncated"]).flatten_indices(), skipped, truncated


def totals(dataset: datasets.Dataset) -> tuple[int, int]:
    """(tokens, trained tokens) of a prepared dataset, computed in Arrow."""
    table = dataset.with_format("arrow")
    tokens = pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0
    trained = pc.sum(pc.list_flatten(table["loss_mask"])).as_py() or 0
    return int(tokens), int(trained)


def build_stats(cfg, tokenizer, rows_in: int, kept: datasets.Dataset, skipped: dict, truncated: int) -> dict:
    """The stats.json contents."""
    tokens, trained = totals(kept)
    chat_template = tokenizer.chat_template
    return {
        "rows_in": rows_in,
        "rows_kept": len(kept),
        "rows_truncated": truncated,  # kept rows cut to max_length (counted among rows_kept)
        "tokens": tokens,
        "trained_tokens": trained,
        "skipped": skipped,
        "model": cfg.model,
        "tokenizer": tokenizer.name_or_path,
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest(),
        "chat_template": chat_template,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "max_length": cfg.max_length,
        "train_user_turns": cfg.train_user_turns,
        "provenance": provenance(),
    }


def _nothing_kept(rows_in: int, skipped: dict) -> PrepareError:
    reasons = ", ".join(f"{r} {n}" for r, n in skipped.items() if n)
    hint = ""
    if skipped["no_assistant_turn"] == rows_in:
        hint = "; the dataset holds prompts without answers: have the target answer them first (baldeagle regenerate)"
    return PrepareError(f"no row could be prepared out of {rows_in} (skipped: {reasons or 'none'}){hint}")


def summary(stats: dict, out: str) -> str:
    """A short human-readable report of a prepare run."""
    line = (
        f"prepared {stats['rows_kept']} of {stats['rows_in']} rows: {stats['tokens']:,} tokens, "
        f"{stats['trained_tokens']:,} trained → {out}"
    )
    if stats["rows_truncated"]:
        line += f"\n{stats['rows_truncated']} kept row(s) truncated to max_length={stats['max_length']} tokens"
    skips = ", ".join(f"{r} {n}" for r, n in stats["skipped"].items() if n)
    return line + (f"\nskipped: {skips}" if skips else "")


def run_prepare(cfg) -> dict:
    """Tokenise `cfg.dataset` with `cfg.model`'s tokenizer and save it to `cfg.out`; return stats."""
    if cfg.max_length < 0:
        raise PrepareError(f"max_length must be 0 (no limit) or positive, got {cfg.max_length}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} already exists; pass --overwrite to replace it")
    ensure_writable(cfg.out)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    template.ensure_chat_template(tokenizer, cfg.chat_template)
    conversations = sources.load_conversations(
        cfg.dataset, cfg.split, cfg.limit, cfg.shuffle, cfg.seed, cfg.system_prompt
    )
    roles = ("user", "assistant") if cfg.train_user_turns else ("assistant",)
    kept, skipped, truncated = tokenise(conversations, tokenizer, cfg.max_length, cfg.strict, cfg.num_proc, roles)
    if len(kept) == 0:
        raise _nothing_kept(len(conversations), skipped)
    stats = build_stats(cfg, tokenizer, len(conversations), kept, skipped, truncated)
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        kept.save_to_disk(str(tmp))
        atomic_write_json(tmp / "stats.json", stats)
        write_resolved(cfg, tmp)
    print(summary(stats, cfg.out), flush=True)
    return stats


def validate_prepared(dataset: datasets.Dataset, where: str) -> None:
    """Check the prepared-data contract: both columns, equal lengths per row, a 0/1 mask."""
    missing = [c for c in ("input_ids", "loss_mask") if c not in dataset.column_names]
    if missing:
        raise PrepareError(f"{where}: missing column(s) {missing}; columns are {dataset.column_names}")
    table = dataset.with_format("arrow")
    ids_len = pc.list_value_length(table["input_ids"])
    mask_len = pc.list_value_length(table["loss_mask"])
    differs = pc.not_equal(ids_len, mask_len)
    if pc.any(differs).as_py():
        row = pc.index(differs, True).as_py()
        raise PrepareError(
            f"{where}: row {row} has {ids_len[row].as_py()} input_ids but {mask_len[row].as_py()} loss_mask values"
        )
    values = pc.list_flatten(table["loss_mask"])
    if len(values) and not pc.all(pc.is_in(values, value_set=pa.array([0, 1], values.type))).as_py():
        raise PrepareError(f"{where}: loss_mask holds values other than 0 and 1")


def load_prepared(path: str | Path) -> tuple[datasets.Dataset, dict]:
    """Read a `prepare` output folder: (dataset with input_ids and loss_mask, stats dict)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"prepared dataset {folder} not found")
    if not (folder / "stats.json").is_file():
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no stats.json); run baldeagle prepare")
    stats = read_json(folder / "stats.json")
    try:
        dataset = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise PrepareError(f"{folder} holds no saved dataset: {error}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise PrepareError(f"{folder} holds a {type(dataset).__name__}, expected one Dataset")
    validate_prepared(dataset, str(folder))
    return dataset, stats
