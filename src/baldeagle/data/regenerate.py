"""`baldeagle regenerate`: the target writes the assistant turns of conversations itself.

A draft learns to predict the target, so it trains best on the target's own answers, not on the
answers a human or another model wrote. Each conversation keeps its system message and user
turns; the target answers them turn by turn (turn t of every conversation in a chunk before turn
t+1), each prompt holding the target's own earlier answers.

`--self-prompts N` first lets the target write N user prompts itself: the chat template is
rendered up to an open user turn and sampled, then prompts cut at the length limit, too short, or
duplicated are dropped. A user with no dataset still gets prompts from the target's own
distribution; mixed with a dataset, they widen its topics. `--self-prompt-openings tasks` steers
them over kinds of task: each prompt starts with an opening such as "Write a Python function that"
(TASK_OPENINGS, one kind after another) and the target writes the rest.

Files (OUT is the output JSONL, which `baldeagle prepare --dataset OUT` reads):
- OUT: one conversation per line, `{"id": "chitchat:17", "messages": [...]}`;
- OUT.self_prompts.jsonl: the self-written prompts, `{"id": "self:3", "prompt": "..."}`;
- OUT.stats.json: rows written and skipped by reason, answers cut at max_new_tokens, generated
  tokens and tokens/s, settings, provenance. It is written last: its presence means "complete".

Resuming: rows already in OUT (by id) are not generated again, and a line cut short by a kill is
dropped and redone. Work is done in chunks of `chunk_size` conversations, appended and fsync'ed
once every turn of the chunk is answered, so a kill loses at most one chunk.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from baldeagle.config import RegenerateConfig, to_dict
from baldeagle.data import sources, template
from baldeagle.data.generation import Sampling, make_generator
from baldeagle.io import atomic_write_json, ensure_writable, provenance

logger = logging.getLogger(__name__)

MIN_PROMPT_CHARS = 10
MIN_OWN_CHARS = 3  # after an opening, the target must add at least this much of its own
# A sampled batch of prompts ends when its longest row does; the last tenth of the rows often costs
# as many steps as the rest (a few ramble to the token cap and are dropped as cut anyway), so a
# self-prompt batch stops once 90% of its rows are finished. It favours shorter prompts slightly.
SELF_PROMPT_FINISH_FRACTION = 0.9
# `--self-prompt-openings tasks`: left alone, a small chat model writes mostly chat-like prompts, so
# its answers teach a draft little code or maths. Each prompt instead starts with one of these
# openings (ours, one kind of task after another) and the target writes the rest of it.
TASK_OPENINGS = {
    "code": ["Write a Python function that", "Write a JavaScript program that", "Fix the bug in this code:",
             "Write a SQL query that"],
    "maths": ["Solve for x:", "Calculate the", "Prove that", "A store sells"],
    "reasoning": ["Solve this puzzle step by step:", "If every", "Which of these statements is true:",
                  "Explain the logic behind"],
    "extraction": ["Extract the names and dates from this text:", "Summarize the following passage:",
                   "Turn this list into a JSON object:", "Classify each of these sentences:"],
    "writing": ["Write a short story about", "Write a persuasive essay on", "Draft a letter to", "Write a poem about"],
    "roleplay": ["Pretend you are", "Act as a", "You are a character in", "Role-play a conversation between"],
    "science": ["Explain how", "What is the difference between", "Describe the process of", "Why does"],
    "humanities": ["Discuss the causes of", "What were the main ideas of", "Compare the philosophies of",
                   "Analyze the role of"],
}


@dataclass
class Conversation:
    id: str
    turns: list[str]  # user messages, in order
    system: str = ""
    answers: list[str] = field(default_factory=list)
    stop_reason: str = ""  # why answering stopped before the last turn ("" = not stopped)

    def messages(self, upto: int) -> list[dict]:
        """System message, then user turns 0..upto with the answers written so far in between."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for k in range(upto + 1):
            messages.append({"role": "user", "content": self.turns[k]})
            if k < len(self.answers):
                messages.append({"role": "assistant", "content": self.answers[k]})
        return messages


# ------------------------------------------------------------------------------------------
# Output file: append-only JSONL with resume
# ------------------------------------------------------------------------------------------


def read_done(path: Path, key: str = "id") -> list[dict]:
    """Complete lines of a JSONL file; a trailing line cut by a kill is truncated away."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    rows = []
    for number, line in enumerate(data[:good].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON ({error}); move the file away to start over") from None
        if not isinstance(row, dict) or key not in row:
            raise ValueError(f"{path} line {number} has no {key!r}: not a file regenerate wrote")
        rows.append(row)
    if good < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good)
    return rows


def append_lines(path: Path, rows: list[dict]) -> None:
    """Append rows as JSON lines and fsync, so a row is either fully on disk or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------------------
# Prompts: from a dataset, or written by the target
# ------------------------------------------------------------------------------------------


def source_label(dataset: str) -> str:
    """A short, stable prefix for row ids: the packaged/preset/hub name, or a file's name."""
    return Path(dataset).name if Path(dataset).suffix else dataset


def conversations_from(cfg: RegenerateConfig, skipped: Counter) -> list[Conversation]:
    """The dataset's conversations reduced to system + user turns; rows without a user turn are counted."""
    if not cfg.dataset:
        return []
    table = sources.load_conversations(cfg.dataset, cfg.split, cfg.limit, cfg.shuffle, cfg.seed, cfg.system_prompt)
    label = source_label(cfg.dataset)
    conversations = []
    for messages, row, skip in zip(table["messages"], table["row"], table["skip"]):
        if skip:  # the source could not read this row (a malformed line)
            skipped[skip.partition(": ")[0]] += 1
            continue
        turns = [m["content"] for m in messages if m["role"] == "user" and isinstance(m["content"], str)
                 and m["content"].strip()]
        if not turns:
            skipped["no_user_turn"] += 1
            continue
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        conversations.append(Conversation(f"{label}:{row}", turns[: cfg.max_turns or None], system or ""))
    return conversations


def open_user_turn(tokenizer, system_prompt: str) -> list[int]:
    """Token ids of the chat template rendered up to where a user message's text starts."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    text = template.render(tokenizer, [*messages, {"role": "user", "content": template.SENTINEL}])
    start = text.find(template.SENTINEL)
    if start < 0:
        raise template.TemplateError("the chat template does not render a user message's text")
    return tokenizer(text[:start], add_special_tokens=False).input_ids


def _normalised(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def self_prompt_openings(setting: str) -> list[str]:
    """`--self-prompt-openings` → the openings, taken in turn ([] = none): 'tasks' cycles the kinds of
    TASK_OPENINGS (each kind's first opening, then each kind's second, ...); else a file, one per line."""
    if not setting:
        return []
    if setting == "tasks":
        return [opening for group in zip(*TASK_OPENINGS.values()) for opening in group]
    path = Path(setting)
    if not path.is_file():
        raise ValueError(f"self_prompt_openings: {setting!r} is neither 'tasks' nor a file of openings")
    openings = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not openings:
        raise ValueError(f"self_prompt_openings: {path} holds no opening (one per line)")
    return openings


def write_self_prompts(cfg: RegenerateConfig, generator, path: Path, counts: Counter) -> list[dict]:
    """Sample user prompts from the target until `cfg.self_prompts` distinct ones are on disk; with
    openings, sample i continues opening i (mod their number), and the prompt is the two together."""
    rows = read_done(path)
    if len(rows) >= cfg.self_prompts:
        return rows[: cfg.self_prompts]
    tokenizer = generator.tokenizer
    prefix = open_user_turn(tokenizer, cfg.system_prompt)
    openings = [tokenizer(text, add_special_tokens=False).input_ids for text in self_prompt_openings(cfg.self_prompt_openings)]
    seen = {_normalised(r["prompt"]) for r in rows}
    rejected: Counter = Counter()
    attempts = 0
    budget = 10 * cfg.self_prompts + 4 * cfg.batch_size  # stop sampling if almost nothing passes the filters
    while len(rows) < cfg.self_prompts and attempts < budget:
        count = min(cfg.batch_size, 2 * (cfg.self_prompts - len(rows)))
        sampling = Sampling(cfg.self_prompt_max_tokens, cfg.self_prompt_temperature, 0.95, cfg.seed + attempts + 1,
                            finish_fraction=SELF_PROMPT_FINISH_FRACTION)
        starts = [openings[(attempts + i) % len(openings)] if openings else [] for i in range(count)]
        attempts += count
        new = []
        for start, completion in zip(starts, generator([prefix + start for start in starts], sampling)):
            counts["self_prompt_tokens"] += len(completion.tokens)
            text = tokenizer.decode(start + completion.tokens, skip_special_tokens=True).strip()
            written = tokenizer.decode(completion.tokens, skip_special_tokens=True).strip()  # the target's part
            short = len(text) < MIN_PROMPT_CHARS or len(written) < MIN_OWN_CHARS
            reason = ("cut_at_max_tokens" if not completion.finished else "too_short" if short
                      else "duplicate" if _normalised(text) in seen else "")
            if reason:
                rejected[reason] += 1
                continue
            seen.add(_normalised(text))
            new.append({"id": f"self:{len(rows) + len(new)}", "prompt": text})
        new = new[: cfg.self_prompts - len(rows)]
        append_lines(path, new)
        rows += new
        logger.info(f"regenerate: {len(rows)}/{cfg.self_prompts} self-written prompts "
                    f"(rejected so far: {dict(rejected) or 'none'})")
    if len(rows) < cfg.self_prompts:
        logger.warning(f"regenerate: only {len(rows)} of {cfg.self_prompts} self-written prompts passed the "
                       f"filters after {attempts} samples ({dict(rejected)})")
    return rows


# ------------------------------------------------------------------------------------------
# Answering, turn by turn
# ------------------------------------------------------------------------------------------


def answer_chunk(chunk: list[Conversation], generator, sampling: Sampling, max_prompt: int, counts: Counter) -> None:
    """Fill `answers` for every conversation in the chunk; stop a conversation at its first bad turn."""
    tokenizer = generator.tokenizer
    for turn in range(max(len(c.turns) for c in chunk)):
        active, prompts = [], []
        for conversation in chunk:
            if conversation.stop_reason or turn >= len(conversation.turns):
                continue
            ids = tokenizer(template.render(tokenizer, conversation.messages(turn), add_generation_prompt=True),
                            add_special_tokens=False).input_ids
            if len(ids) > max_prompt:
                conversation.stop_reason = "prompt_too_long"
                continue
            active.append(conversation)
            prompts.append(ids)
        if not active:
            break
        for conversation, completion in zip(active, generator(prompts, sampling)):
            text = tokenizer.decode(completion.tokens, skip_special_tokens=True).strip()
            counts["generated_tokens"] += len(completion.tokens)
            if not text:
                conversation.stop_reason = "empty_answer"
                continue
            conversation.answers.append(text)
            counts["answers"] += 1
            counts["answers_cut_at_max_new_tokens"] += not completion.finished


def finished_rows(chunk: list[Conversation], skipped: Counter) -> list[dict]:
    """Output rows: each conversation up to its last answered turn; those with no answer are counted."""
    rows = []
    for conversation in chunk:
        if not conversation.answers:
            skipped[conversation.stop_reason or "empty_answer"] += 1
            continue
        messages = conversation.messages(len(conversation.answers) - 1)
        rows.append({"id": conversation.id, "messages": messages})
    return rows


def check_settings(cfg: RegenerateConfig) -> None:
    if not cfg.dataset and cfg.self_prompts <= 0:
        raise ValueError("nothing to regenerate: give --dataset, --self-prompts N, or both")
    for name in ("max_new_tokens", "batch_size", "chunk_size", "max_prompt_tokens", "self_prompt_max_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.temperature < 0 or cfg.self_prompt_temperature <= 0:
        raise ValueError("temperature must be >= 0 and self_prompt_temperature > 0")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.self_prompts < 0 or cfg.max_turns < 0:
        raise ValueError("self_prompts and max_turns must be >= 0")
    self_prompt_openings(cfg.self_prompt_openings)  # a missing or empty file fails before the model loads


def _answer_pending(cfg: RegenerateConfig, pending: list[Conversation], generator, out: Path, counts: Counter,
                    skipped: Counter, start: float) -> tuple[int, int]:
    """Answer the pending conversations chunk by chunk, appending each chunk's rows to `out`, until
    done or out of time (one chunk at least) → (rows written, conversations processed)."""
    from tqdm.auto import tqdm

    max_prompt = cfg.max_prompt_tokens
    if generator.context:
        max_prompt = min(max_prompt, generator.context - cfg.max_new_tokens)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    written = processed = 0
    bar = tqdm(total=len(pending), desc="regenerate", unit="conv")
    for first in range(0, len(pending), cfg.chunk_size):
        if first and cfg.max_minutes and time.monotonic() - start > 60 * cfg.max_minutes:  # one chunk at least
            logger.info(f"regenerate: time budget of {cfg.max_minutes} minutes reached; "
                        f"{len(pending) - first} conversations left for a later run")
            break
        chunk = pending[first:first + cfg.chunk_size]
        answer_chunk(chunk, generator, sampling, max_prompt, counts)
        rows = finished_rows(chunk, skipped)
        append_lines(out, rows)
        written += len(rows)
        processed += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(answer_tokens=counts["generated_tokens"])
    bar.close()
    return written, processed


def run_regenerate(cfg: RegenerateConfig) -> dict:
    """`baldeagle regenerate`: the target answers the user turns (and, with --self-prompts, prompts it
    writes itself); resumable, appending to a JSONL file."""
    check_settings(cfg)
    ensure_writable(cfg.out)
    out = Path(cfg.out)
    skipped: Counter = Counter()
    conversations = conversations_from(cfg, skipped)  # dataset errors surface before the model loads
    if cfg.dataset and not conversations and cfg.self_prompts <= 0:
        raise ValueError(f"dataset {cfg.dataset!r}: no conversation has a user turn to answer "
                         f"({sum(skipped.values())} rows read)")
    done = {row["id"] for row in read_done(out)}
    generator = make_generator(cfg.backend, cfg.model, cfg.target_dtype, cfg.batch_size, cfg.tensor_parallel_size,
                               cfg.trust_remote_code, cfg.seed)
    start = time.monotonic()
    counts: Counter = Counter()
    self_rows = []
    if cfg.self_prompts:
        self_rows = write_self_prompts(cfg, generator, out.with_name(out.name + ".self_prompts.jsonl"), counts)
    conversations += [Conversation(r["id"], [r["prompt"]], cfg.system_prompt) for r in self_rows]
    # Mixed order (seeded): a time-boxed or interrupted run keeps a sample of every source.
    random.Random(cfg.seed).shuffle(conversations)
    pending = [c for c in conversations if c.id not in done]
    if not conversations:
        raise ValueError("no usable prompt: the dataset has no user turn and the target wrote no usable prompt")
    written, processed = _answer_pending(cfg, pending, generator, out, counts, skipped, start)

    seconds = time.monotonic() - start
    total = len(read_done(out))
    if total == 0:
        raise ValueError(f"no conversation could be answered ({dict(skipped)}); nothing written to {out}")
    stats = _stats(cfg, total, written, len(conversations) - len(pending), len(pending) - processed, len(self_rows),
                   skipped, counts, seconds)
    atomic_write_json(out.with_name(out.name + ".stats.json"), stats)
    print(f"regenerate: {total} conversations in {out} ({written} new, {stats['rows_already_done']} already done); "
          f"{counts['answers']} answers, {counts['generated_tokens']} tokens at {stats['tokens_per_second']} tok/s; "
          f"skipped {dict(skipped) or 'none'}", flush=True)
    return stats


def _stats(cfg: RegenerateConfig, total, written, already_done, left, self_prompts, skipped, counts, seconds) -> dict:
    """OUT.stats.json: rows, answers, tokens, speed, the settings and provenance."""
    return {
        "rows_total": total, "rows_written_this_run": written, "rows_already_done": already_done,
        "rows_left": left,
        "self_prompts": self_prompts, "skipped": dict(skipped), "answers": counts["answers"],
        "answers_cut_at_max_new_tokens": counts["answers_cut_at_max_new_tokens"],
        "generated_tokens": counts["generated_tokens"], "self_prompt_sampled_tokens": counts["self_prompt_tokens"],
        "seconds": round(seconds, 1),
        "tokens_per_second": round((counts["generated_tokens"] + counts["self_prompt_tokens"]) / max(seconds, 1e-9), 1),
        "settings": to_dict(cfg), "provenance": provenance(),
    }
