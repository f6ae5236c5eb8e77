"""`view`: the same segments drive the terminal and the HTML output."""

import json
import re

from tiny_chat import CHATML, bpe_tokenizer, char_tokenizer, decode, save_tokenizer

from baldeagle import cli
from baldeagle.config import PrepareConfig, ViewConfig
from baldeagle.data.prepare import run_prepare
from baldeagle.data.view import NEWLINE, RESET, Segment, html_page, row_segments, run_view, terminal_row, token_texts


def test_token_texts_concatenate_to_the_decoded_row():
    tokenizer = bpe_tokenizer()
    text = "<|im_start|>user\nCafé crème ☕ and 日本<|im_end|>\nHello there"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = token_texts(tokenizer, ids)
    assert "".join(texts) == decode(tokenizer, ids)
    assert texts[0] == "<|im_start|>" and texts[-1] == " there"
    assert "\ufffd" not in "".join(texts)  # multi-byte characters split over tokens are rejoined


def test_row_segments_follow_the_mask():
    tokenizer = char_tokenizer()
    segments = row_segments(tokenizer, tokenizer("ab\nc", add_special_tokens=False)["input_ids"], [0, 1, 1, 0])
    assert [(s.index, s.text, s.trained) for s in segments] == [
        (0, "a", False), (1, "b", True), (2, "\n", True), (3, "c", False)]


SEGMENTS = [Segment(0, 10, "<|im_start|>", False), Segment(1, 11, "Hi", True), Segment(2, 12, "\n", True),
            Segment(3, 13, "<b>&", False)]


def test_terminal_row():
    text = terminal_row(7, SEGMENTS)
    assert text.startswith("── row 7: 4 tokens, 2 trained ──\n")
    assert f"\x1b[30;102mHi{RESET}" in text  # trained, odd index: bright green
    assert f"\x1b[30;42m{NEWLINE}{RESET}\n" in text  # trained newline: ⏎ then a real line break
    assert f"\x1b[2;37m<|im_start|>{RESET}" in text and f"\x1b[2;36m<b>&{RESET}" in text  # untrained, dim
    short = terminal_row(7, SEGMENTS, max_tokens=2)
    assert "… 2 more tokens" in short and "<b>&" not in short


def test_html_page():
    page = html_page("demo", [(7, SEGMENTS)])
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<link" not in page
    assert "trained (in the loss)" in page and "untrained (context only)" in page  # legend
    assert "row 7: 4 tokens, 2 trained" in page
    assert '<span class="u0" title="index 0 · id 10 · untrained">&lt;|im_start|&gt;</span>' in page
    assert '<span class="t1" title="index 1 · id 11 · trained">Hi</span>' in page
    assert f'<span class="t0" title="index 2 · id 12 · trained">{NEWLINE}\n</span>' in page
    assert "&lt;b&gt;&amp;" in page


def test_run_view_terminal_and_html(tmp_path, capsys):
    model = str(save_tokenizer(char_tokenizer(CHATML), tmp_path / "model"))
    data = tmp_path / "rows.jsonl"
    rows = [[{"role": "user", "content": f"Q{k}"}, {"role": "assistant", "content": f"Answer {k}"}] for k in range(4)]
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    run_prepare(PrepareConfig(model=model, dataset=str(data), out=str(tmp_path / "prepared")))
    capsys.readouterr()
    page = tmp_path / "view.html"
    shown = run_view(ViewConfig(data=str(tmp_path / "prepared"), rows=2, start=1, html=str(page)))
    out = capsys.readouterr().out
    assert [row for row, _ in shown] == [1, 2]
    trained = len("Answer 1") + 1
    assert f"row 1: {len(shown[0][1])} tokens, {trained} trained" in out and "row 3" not in out
    html = page.read_text()
    assert f"row 2: {len(shown[1][1])} tokens, {trained} trained" in html
    assert len(re.findall(r'class="t[01]"', html)) == 2 * trained + 1  # trained spans + the legend's sample
    assert cli.main(["view", str(tmp_path / "prepared"), "--start", "9"]) == 2
    assert "outside the dataset's 4 rows" in capsys.readouterr().err


def test_terminal_row_escapes_control_characters_from_the_data():
    hostile = "\x1b]0;pwned\x07\x1b[2J\rover\x9b31m\u202eevil\tok"
    text = terminal_row(0, [Segment(0, 1, hostile, True), Segment(1, 2, "é\n", False)])
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\rover\\x9b31m\\u202eevil\tok" in text
    assert f"é{NEWLINE}" in text  # printable text and newlines are unchanged
    ours = re.compile(r"\x1b\[[0-9;]*m")  # the styles terminal_row adds itself
    assert not [ch for ch in ours.sub("", text) if ch not in "\n\t" and (ord(ch) < 32 or 127 <= ord(ch) < 160)]
