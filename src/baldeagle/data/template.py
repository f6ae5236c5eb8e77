"""Chat-template rendering and the loss mask (assistant turns, optionally user turns too), for any
template (no per-model rules).

How an assistant turn is found, for turn `i` of a conversation `m`:

    prefix_i = render(m[:i], add_generation_prompt=True)   # ends right after the assistant header
    upto_i   = render(m[:i + 1])                            # ends after the content and end-of-turn
    full     = render(m)
    head_i   = render(m[:i] + [assistant SENTINEL]) up to the sentinel   # where the content starts

The template must be *prefix-stable*: `prefix_i` is a string prefix of `upto_i`, and `upto_i` of
`full`. Then `full[len(prefix_i):len(upto_i)]` is exactly what the template wrote for turn `i`
(the "segment"). Where the content starts inside it is found by rendering the turn once more with
a sentinel as its content (`head_i` = the text before the sentinel), so a separator the template
adds (Mistral's space after `[/INST]`) is told apart from whitespace that belongs to the content.
The trained characters run from there to the last non-whitespace character of the segment: the
content as the template rendered it (Llama-3's `| trim` included) followed by the end-of-turn
marker(s), e.g. `content<|im_end|>` for ChatML (not the newline after it), `content<|eot_id|>`
for Llama-3, `content</s>` for Llama-2/Mistral, `content<end_of_turn>` for Gemma. Whitespace
after the end-of-turn marker is never trained: generation stops at the marker.

User turns, when trained (`roles` holds "user"), are found the same way with
`prefix_i = render(m[:i])` (no generation prompt; "" for turn 0) and a user sentinel: their content
and end-of-turn marker are trained, their header never (a default system prompt the template
writes before the first user turn is header too).

The full text is tokenised once (`add_special_tokens=False`: templates write their own BOS) with
offsets. A token is trained when it lies inside the segment and overlaps the trained characters.
Consequences, for tokenizers that merge characters across the boundaries:
- a token that also covers part of the header (starts before the segment) is *not* trained;
- a token that merges the template's separator with the first word of the content (byte-level
  ` Hello` after `[/INST]`) *is* trained, so that separator decodes too.
For byte-level BPE tokenizers with ChatML, Llama-3 or Gemma templates the mask is exact.

Cost: locating turn i renders the conversation before it (twice, or three times when the
template rewrites the content, e.g. trims it), so a row costs O(turns²) message renders; turns
that start beyond `max_length` tokens are not located. Templates need no `{% generation %}`
markers. Contents holding a literal control token (`<|im_end|>`) tokenise as that token, as with
`apply_chat_template` itself.
"""

from __future__ import annotations

from pathlib import Path

from baldeagle.errors import BaldEagleError

ROLES = ("system", "user", "assistant")
SENTINEL = "BaldEagleContentSentinel7f3a"  # rendered in place of a content to find where it starts


class TemplateError(BaldEagleError):
    """The chat template cannot render this conversation or cannot be masked exactly."""


def ensure_chat_template(tokenizer, template_file: str = "") -> None:
    """Install `template_file` as the tokenizer's chat template, or check it already has one."""
    if template_file:
        path = Path(template_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"chat template file {path} not found")
        tokenizer.chat_template = path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "pass one as a Jinja file with --chat-template FILE"
        )


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`; template exceptions become `TemplateError`."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError:
        raise
    except Exception as error:  # jinja2 errors, raise_exception(...) in templates, bad values
        raise TemplateError(f"chat template failed: {type(error).__name__}: {error}") from None
    if not isinstance(text, str):
        raise TemplateError(f"chat template rendered {type(text).__name__}, expected a string")
    return text


def _locate_turn(tokenizer, messages: list[dict], i: int, full: str) -> tuple[int, int, int, int]:
    """(seg_start, seg_end, start, end) of turn i (assistant or user) inside `full` (see the module notes)."""
    role = messages[i]["role"]
    if role == "assistant":
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
    else:  # a user turn follows the turns before it with no generation prompt; turn 0 follows nothing
        prefix = render(tokenizer, messages[:i]) if i else ""
    probe = render(tokenizer, messages[:i] + [{"role": role, "content": SENTINEL}])
    content = messages[i]["content"]
    at = probe.find(SENTINEL)
    head = probe[:at] if at >= 0 else ""
    # A template that renders the content as given needs no third render: the probe with the
    # content put back must then be exactly the start of the full text (checked here).
    upto = head + content + probe[at + len(SENTINEL):]
    if at < 0 or not full.startswith(upto):
        upto = render(tokenizer, messages[: i + 1])
    if content.strip() not in upto:
        raise TemplateError(
            f"the chat template does not render {role} turn {i} (its content is missing "
            f"from the text); a template for training must render {role} messages"
        )
    if at < 0 or not (upto.startswith(head) and head.startswith(prefix) and full.startswith(upto)):
        raise TemplateError(
            f"the chat template is not prefix-stable at {role} turn {i}: rendering the "
            "conversation up to a turn does not start with the rendering up to the turn "
            "before it (plus the generation prompt) (the template rewrites earlier turns)"
        )
    start, end = len(head), len(upto.rstrip())
    if content.strip() not in full[start:end]:
        raise TemplateError(f"{role} turn {i}'s content is not where the template's header ends")
    return len(prefix), len(upto), start, end


def trained_spans(
    tokenizer, messages: list[dict], full: str | None = None, char_limit: int | None = None,
    roles: tuple[str, ...] = ("assistant",),
) -> tuple[str, list[tuple[int, int, int, int]]]:
    """Render `messages`; return (full text, one (seg_start, seg_end, start, end) per trained turn:
    each assistant turn, and each turn of the other `roles` too (("user", "assistant") trains the
    user's words as well).

    [seg_start, seg_end) is everything the template wrote for the turn after its header;
    [start, end) the trained characters inside it (content + end-of-turn marker). Turns that
    start at or after `char_limit` (the end of what truncation keeps) are not located: each
    turn costs renders of the whole conversation before it, so long rows stop early.
    """
    if not any(m["role"] == "assistant" for m in messages):
        raise TemplateError("the conversation has no assistant turn to train on")
    full = render(tokenizer, messages) if full is None else full
    limit = len(full) if char_limit is None else char_limit
    spans = []
    for i, message in enumerate(messages):
        if message["role"] in roles:
            span = _locate_turn(tokenizer, messages, i, full)
            if span[0] >= limit:
                break
            spans.append(span)
    return full, spans


def _trained(offset: tuple[int, int], span: tuple[int, int, int, int]) -> bool:
    """Whether a token with character `offset` is trained for one assistant `span`."""
    token_start, token_end = offset
    seg_start, seg_end, start, end = span
    if token_start < seg_start or token_end > seg_end:
        return False
    if token_start == token_end:  # a zero-width token: trained where it sits
        return start <= token_start < end
    return token_start < end and token_end > start


def tokenize_with_mask(tokenizer, messages: list[dict], max_length: int = 0,
                       roles: tuple[str, ...] = ("assistant",)) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask marking the tokens of the turns of
    `roles` (the assistant's by default).

    With `max_length`, both are truncated to that many tokens; the mask may then be all zeros
    (no trained token fits), which the caller reports as too long.
    """
    ids, mask, _ = tokenize_row(tokenizer, messages, max_length, roles)
    return ids, mask


def tokenize_row(tokenizer, messages: list[dict], max_length: int = 0,
                 roles: tuple[str, ...] = ("assistant",)) -> tuple[list[int], list[int], int]:
    """`tokenize_with_mask`, and how many tokens the rendered conversation has before truncation."""
    full = render(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    total = len(ids)
    truncated = bool(max_length) and total > max_length
    if truncated:
        ids, offsets = ids[:max_length], offsets[:max_length]
    _, spans = trained_spans(tokenizer, messages, full, offsets[-1][1] if truncated else None, roles)
    mask = [0] * len(ids)
    span_index = 0
    for k, offset in enumerate(offsets):
        # spans are sorted and disjoint; skip those that end before this token starts
        while span_index < len(spans) and spans[span_index][1] <= offset[0]:
            span_index += 1
        if span_index < len(spans) and _trained(offset, spans[span_index]):
            mask[k] = 1
    if not truncated and not any(mask):
        raise TemplateError("no token of the rendered text falls inside an assistant turn")
    return ids, mask, total
