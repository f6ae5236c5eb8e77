"""`baldeagle view DIR`: show which tokens of a prepared dataset are trained.

Both outputs are drawn from the same pure data: `row_segments` turns one row into a list of
`Segment`s (token index, id, text, trained). The terminal shows trained tokens on a green
background and untrained tokens dimmed, alternating two shades so token boundaries are visible;
a newline shows as ⏎ followed by a real line break, and other control characters from the data
(escape sequences, carriage returns, bidi overrides) as visible escapes such as `\\x1b`.
`--html FILE` writes the same segments as a self-contained page (inline CSS, a legend, per-row
counts, a tooltip with each token's index/id).
"""

from __future__ import annotations

import html
import sys
import unicodedata
from dataclasses import dataclass

from baldeagle.data.prepare import load_prepared
from baldeagle.io import atomic_write_text
from baldeagle.targets import load_tokenizer

NEWLINE = "⏎"
WINDOW = 6  # tokens of left context used to decode one token's text
# ANSI styles: (trained, untrained) × (even, odd) token index.
ANSI = {
    (True, 0): "\x1b[30;42m", (True, 1): "\x1b[30;102m",
    (False, 0): "\x1b[2;37m", (False, 1): "\x1b[2;36m",
}
RESET = "\x1b[0m"
BIDI_CONTROLS = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
CSS = """
body { font-family: ui-monospace, Menlo, Consolas, monospace; margin: 2em; background: #fff; color: #222; }
.row { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em; margin: 1em 0; }
.head { font-weight: bold; margin-bottom: 0.5em; font-family: sans-serif; }
.text { white-space: pre-wrap; word-break: break-all; line-height: 1.6; }
.t0 { background: #a5e6a5; } .t1 { background: #6fd16f; }
.u0 { background: #f2f2f2; color: #888; } .u1 { background: #e2e2e2; color: #888; }
.legend span { padding: 0.1em 0.5em; margin-right: 1em; }
"""


@dataclass(frozen=True)
class Segment:
    """One token as shown: its position in the row, id, decoded text and whether it is trained."""

    index: int
    token_id: int
    text: str
    trained: bool


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text; concatenated they give the row's text.

    A token is decoded together with a few tokens before it, so SentencePiece spaces and
    multi-byte characters split across tokens come out right (a character appears with the
    token that completes it).
    """
    texts = []
    for k in range(len(ids)):
        start = max(0, k - WINDOW)
        before = _decode(tokenizer, ids[start:k]).rstrip("\ufffd")
        upto = _decode(tokenizer, ids[start : k + 1]).rstrip("\ufffd")
        texts.append(upto[len(before):] if upto.startswith(before) else _decode(tokenizer, ids[k : k + 1]))
    return texts


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""


def row_segments(tokenizer, input_ids: list[int], loss_mask: list[int]) -> list[Segment]:
    """A prepared row → its segments (the single source both outputs draw from)."""
    texts = token_texts(tokenizer, input_ids)
    return [Segment(k, t, text, bool(m)) for k, (t, m, text) in enumerate(zip(input_ids, loss_mask, texts))]


def row_title(row: int, segments: list[Segment]) -> str:
    trained = sum(s.trained for s in segments)
    return f"row {row}: {len(segments)} tokens, {trained} trained"


def visible(text: str) -> str:
    r"""`text` safe to print: control characters other than newline and tab, and bidi overrides,
    become visible escapes (`\x1b`, `\r`, `\u202e`) instead of acting on the terminal."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if ch not in "\n\t" and (unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS) else ch
        for ch in text
    )


def terminal_row(row: int, segments: list[Segment], max_tokens: int = 0) -> str:
    """One row for a terminal: header line, then the coloured tokens."""
    shown = segments[:max_tokens] if max_tokens else segments
    parts = []
    for s in shown:
        style = ANSI[(s.trained, s.index % 2)]
        lines = visible(s.text).split("\n")
        marked = [line + NEWLINE for line in lines[:-1]] + [lines[-1]]
        parts.append("\n".join(f"{style}{piece}{RESET}" if piece else "" for piece in marked))
    more = f"\n… {len(segments) - len(shown)} more tokens" if len(shown) < len(segments) else ""
    return f"── {row_title(row, segments)} ──\n{''.join(parts)}{more}\n"


def html_row(row: int, segments: list[Segment]) -> str:
    """One row as an HTML block: header with counts, then one span per token."""
    spans = []
    for s in segments:
        kind = "t" if s.trained else "u"
        text = html.escape(s.text.replace("\n", NEWLINE + "\n"))
        title = f"index {s.index} · id {s.token_id} · {'trained' if s.trained else 'untrained'}"
        spans.append(f'<span class="{kind}{s.index % 2}" title="{title}">{text}</span>')
    head = f'<div class="head">{html.escape(row_title(row, segments))}</div>'
    return f'<div class="row">{head}<div class="text">{"".join(spans)}</div></div>'


def html_page(title: str, rows: list[tuple[int, list[Segment]]]) -> str:
    """A self-contained page with a legend and the given rows."""
    legend = (
        '<div class="legend"><span class="t0">trained (in the loss)</span>'
        '<span class="u0">untrained (context only)</span>'
        f"<span>{NEWLINE} = newline · alternating shades mark token boundaries · "
        "hover a token for its index and id</span></div>"
    )
    body = "\n".join(html_row(row, segments) for row, segments in rows)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{legend}\n{body}\n</body></html>\n"
    )


def run_view(cfg) -> list[tuple[int, list[Segment]]]:
    """Print `cfg.rows` rows from `cfg.start` of the prepared dataset in `cfg.data`; optionally HTML."""
    if not cfg.data:
        raise FileNotFoundError("pass the prepared dataset folder: baldeagle view DIR")
    dataset, stats = load_prepared(cfg.data)
    if not 0 <= cfg.start < len(dataset):
        raise ValueError(f"--start {cfg.start} is outside the dataset's {len(dataset)} rows")
    tokenizer = load_tokenizer(cfg.model or stats.get("model") or stats.get("tokenizer"))
    stop = min(len(dataset), cfg.start + max(cfg.rows, 1))
    rows = []
    for k in range(cfg.start, stop):
        row = dataset[k]
        rows.append((k, row_segments(tokenizer, row["input_ids"], row["loss_mask"])))
    legend = f"{ANSI[(True, 0)]}trained{RESET} {ANSI[(False, 0)]}untrained{RESET} {NEWLINE} = newline"
    print(f"{cfg.data}: {len(dataset)} rows, {stats.get('trained_tokens', '?')} trained tokens · {legend}")
    for row, segments in rows:
        sys.stdout.write(terminal_row(row, segments, cfg.max_tokens))
    if cfg.html:
        atomic_write_text(cfg.html, html_page(f"BaldEagle loss mask: {cfg.data}", rows))
        print(f"wrote {cfg.html}")
    return rows
