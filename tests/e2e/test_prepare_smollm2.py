"""`baldeagle prepare` and `view` on the packaged SmolLM2 tokenizer and packaged data (offline)."""

import json
import re
from pathlib import Path

import pytest

from baldeagle import cli
from baldeagle.data.prepare import check_conversation, load_prepared
from baldeagle.data.sources import load_conversations
from baldeagle.targets import load_tokenizer

from tiny_chat import trained_runs  # shared with the unit tests (tests/unit is on the path)

pytestmark = pytest.mark.e2e

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def assert_exact_masks(tokenizer, dataset, conversations, max_length=2048):
    """Each kept row's trained tokens decode to its assistant contents, each + <|im_end|>.

    A row cut at `max_length` keeps its first turns whole and the start of the one it cuts.
    """
    assert len(dataset) == len(conversations)
    truncated = 0
    for row, messages in zip(dataset, conversations):
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        runs = trained_runs(tokenizer, row["input_ids"], row["loss_mask"])
        text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
        assert text.startswith(f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n")
        if len(row["input_ids"]) < max_length:
            assert runs == expected
            continue
        truncated += 1
        last = len(runs) - 1
        assert runs[:last] == expected[:last] and expected[last].startswith(runs[last].rstrip("\ufffd"))
    return truncated


def test_prepare_mtbench(tmp_path, tokenizer, capsys):
    out = tmp_path / "mtbench"
    assert cli.main(["prepare", "--model", "smollm2", "--dataset", "mtbench", "--out", str(out)]) == 0
    assert "prepared 39 of 80 rows" in capsys.readouterr().out
    dataset, stats = load_prepared(out)
    assert stats["rows_in"] == 80 and stats["rows_kept"] == 39
    assert stats["skipped"]["no_assistant_turn"] == 41 and sum(stats["skipped"].values()) == 41
    assert stats["trained_tokens"] == sum(sum(r) for r in dataset["loss_mask"])
    answered = [m for m in load_conversations("mtbench")["messages"] if check_conversation(m) is None]
    assert assert_exact_masks(tokenizer, dataset, answered) == 0


def test_prepare_chitchat_and_view(tmp_path, tokenizer, capsys):
    out = tmp_path / "chitchat"
    argv = ["prepare", "--model", "smollm2", "--dataset", "chitchat", "--limit", "200", "--out", str(out)]
    assert cli.main(argv) == 0
    dataset, stats = load_prepared(out)
    conversations = load_conversations("chitchat", limit=200)["messages"]
    kept = [m for m in conversations if check_conversation(m) is None]
    assert stats["rows_in"] == 200 and stats["rows_kept"] == len(kept) > 50
    assert stats["skipped"]["too_long"] == 0  # (checked so the comparison below lines up)
    assert 0 < assert_exact_masks(tokenizer, dataset, kept) < len(kept)  # some rows are cut at 2048
    assert json.loads((out / "stats.json").read_text())["tokenizer"]

    page = tmp_path / "view.html"
    capsys.readouterr()
    assert cli.main(["view", str(out), "--rows", "2", "--html", str(page)]) == 0
    terminal = capsys.readouterr().out
    html = page.read_text()
    assert "trained (in the loss)" in html and "untrained (context only)" in html
    for k in range(2):
        counts = f"row {k}: {len(dataset[k]['input_ids'])} tokens, {sum(dataset[k]['loss_mask'])} trained"
        assert counts in html and counts in terminal
    assert len(re.findall(r'class="t[01]"', html)) == sum(dataset[0]["loss_mask"]) + sum(dataset[1]["loss_mask"]) + 1


def test_prepare_from_the_tokenizer_files_alone(tmp_path):
    """SmolLM2's tokenizer files and chat template, without config.json or weights, prepare the same
    rows as the packaged model folder."""
    import shutil

    from baldeagle.targets import resolve_model

    full = Path(resolve_model("smollm2"))
    only = tmp_path / "tokenizer-only"
    only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (full / name).is_file():
            shutil.copy(full / name, only / name)
    for model, out in ((str(full), tmp_path / "full"), (str(only), tmp_path / "only")):
        assert cli.main(["prepare", "--model", model, "--dataset", "mtbench", "--out", str(out)]) == 0
    (a, _), (b, _) = load_prepared(tmp_path / "full"), load_prepared(tmp_path / "only")
    assert len(a) == 39 and a["input_ids"] == b["input_ids"] and a["loss_mask"] == b["loss_mask"]
