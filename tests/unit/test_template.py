"""The loss mask (assistant turns, and user turns when asked) is exact for hand-written templates of each family."""

import pytest
from tiny_chat import (
    CHATML,
    DEFAULT_SYSTEM,
    DROPS_ASSISTANT,
    GEMMA,
    GEMMA_FOLD,
    LAST_TURN_DIFFERENT,
    LLAMA3,
    MISTRAL,
    bpe_tokenizer,
    char_tokenizer,
    decode,
    trained_runs,
    trained_text,
)

from baldeagle.data.template import (
    TemplateError,
    _trained,
    ensure_chat_template,
    render,
    tokenize_with_mask,
    trained_spans,
)


def conversation(system: str | None = None) -> list[dict]:
    """Three assistant turns, with whitespace at the edges of some contents."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi! How are you?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the cat sit on the computer?\nTo keep an eye on the mouse."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "  You are welcome. \n"},
    ]


def answers(messages, trim=False) -> list[str]:
    return [m["content"].strip() if trim else m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("make", [char_tokenizer, bpe_tokenizer], ids=["chars", "bpe"])
def test_chatml_with_default_system_prompt(make):
    tokenizer = make(CHATML)
    messages = conversation()
    ids, mask = tokenize_with_mask(tokenizer, messages)
    text = decode(tokenizer, ids)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHello there!")
    # Untrimmed ChatML: the content exactly as written, then <|im_end|> (not the newline after it).
    expected = [content + "<|im_end|>" for content in answers(messages)]
    assert trained_runs(tokenizer, ids, mask) == expected
    assert trained_text(tokenizer, ids, mask) == "".join(expected)
    assert len(ids) == len(mask) and set(mask) == {0, 1}


def test_chatml_keeps_a_given_system_prompt():
    tokenizer = char_tokenizer(CHATML)
    messages = conversation(system="Be brief.")
    ids, mask = tokenize_with_mask(tokenizer, messages)
    assert DEFAULT_SYSTEM not in decode(tokenizer, ids)
    assert trained_runs(tokenizer, ids, mask) == [c + "<|im_end|>" for c in answers(messages)]


@pytest.mark.parametrize("make", [char_tokenizer, bpe_tokenizer], ids=["chars", "bpe"])
def test_llama3_trims_content(make):
    tokenizer = make(LLAMA3)
    messages = conversation(system="Be brief.")
    ids, mask = tokenize_with_mask(tokenizer, messages)
    assert decode(tokenizer, ids).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
    assert trained_runs(tokenizer, ids, mask) == [c + "<|eot_id|>" for c in answers(messages, trim=True)]
    assert trained_runs(tokenizer, ids, mask)[-1] == "You are welcome.<|eot_id|>"


def test_mistral_inst_format():
    tokenizer = char_tokenizer(MISTRAL)
    messages = conversation()
    ids, mask = tokenize_with_mask(tokenizer, messages)
    text = decode(tokenizer, ids)
    assert text.startswith("<s>[INST] Hello there! [/INST] Hi! How are you?</s>[INST] Tell me")
    # The space the template puts before the content is untrained; the spaces the last content
    # starts with are its own and are trained.
    assert trained_runs(tokenizer, ids, mask) == [c + "</s>" for c in answers(messages)]
    assert trained_runs(tokenizer, ids, mask)[-1] == "  You are welcome. \n</s>"


def test_mistral_word_merged_with_leading_space_is_trained():
    # With a byte-level BPE " Hi" is one token covering the template's space: it stays trained
    # (dropping it would lose the answer's first word), so its space decodes too.
    tokenizer = bpe_tokenizer(MISTRAL)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there!"}]
    ids, mask = tokenize_with_mask(tokenizer, messages)
    first = mask.index(1)
    assert decode(tokenizer, ids[first : first + 1]) == " Hello"
    assert trained_runs(tokenizer, ids, mask) == [" Hello there!</s>"]


@pytest.mark.parametrize("make", [char_tokenizer, bpe_tokenizer], ids=["chars", "bpe"])
def test_gemma_end_of_turn_without_newline(make):
    tokenizer = make(GEMMA)
    messages = conversation()
    ids, mask = tokenize_with_mask(tokenizer, messages)
    assert "<start_of_turn>model\nHi! How are you?<end_of_turn>\n" in decode(tokenizer, ids)
    assert trained_runs(tokenizer, ids, mask) == [c + "<end_of_turn>" for c in answers(messages, trim=True)]


@pytest.mark.parametrize("template", [GEMMA, MISTRAL], ids=["gemma", "mistral"])
def test_templates_that_reject_a_system_role(template):
    with pytest.raises(TemplateError, match="supported"):
        tokenize_with_mask(char_tokenizer(template), conversation(system="Be brief."))


def test_gemma_folding_system_into_first_user_turn():
    tokenizer = char_tokenizer(GEMMA_FOLD)
    messages = conversation(system="Be brief.")
    ids, mask = tokenize_with_mask(tokenizer, messages)
    assert "<start_of_turn>user\nBe brief.\n\nHello there!<end_of_turn>" in decode(tokenizer, ids)
    assert trained_runs(tokenizer, ids, mask) == [c + "<end_of_turn>" for c in answers(messages, trim=True)]


USER_TOO = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi! How are you?"},
            {"role": "user", "content": " Tell me a joke. "}, {"role": "assistant", "content": "Why?"}]


@pytest.mark.parametrize(
    "template, system, expected",
    [
        # ChatML keeps the content as written; its default system prompt is header, never trained.
        (CHATML, None, ["Hello there!<|im_end|>", "Hi! How are you?<|im_end|>", " Tell me a joke. <|im_end|>",
                        "Why?<|im_end|>"]),
        # Llama-3 trims every content; the given system prompt stays untrained.
        (LLAMA3, "Be brief.", ["Hello there!<|eot_id|>", "Hi! How are you?<|eot_id|>", "Tell me a joke.<|eot_id|>",
                               "Why?<|eot_id|>"]),
        # A user turn of [INST] ends with the template's " [/INST]"; the space after it is the assistant's header.
        (MISTRAL, None, ["Hello there! [/INST]", "Hi! How are you?</s>", " Tell me a joke.  [/INST]", "Why?</s>"]),
        (GEMMA, None, ["Hello there!<end_of_turn>", "Hi! How are you?<end_of_turn>", "Tell me a joke.<end_of_turn>",
                       "Why?<end_of_turn>"]),
        # A system prompt folded into the first user turn is that turn's header: only the user's words train.
        (GEMMA_FOLD, "Be brief.", ["Hello there!<end_of_turn>", "Hi! How are you?<end_of_turn>",
                                   "Tell me a joke.<end_of_turn>", "Why?<end_of_turn>"]),
    ],
    ids=["chatml", "llama3", "mistral", "gemma", "gemma-fold"],
)
def test_user_turns_trained_when_asked(template, system, expected):
    tokenizer = char_tokenizer(template)
    messages = ([{"role": "system", "content": system}] if system else []) + USER_TOO
    ids, mask = tokenize_with_mask(tokenizer, messages, roles=("user", "assistant"))
    assert trained_runs(tokenizer, ids, mask) == expected
    # The default mask is the same tokens less the user's: same ids, a subset of the trained positions.
    ids_default, mask_default = tokenize_with_mask(tokenizer, messages)
    assert ids_default == ids
    assert trained_runs(tokenizer, ids, mask_default) == expected[1::2]
    assert all(m >= d for m, d in zip(mask, mask_default))


def test_user_turn_spans_start_after_the_default_system_prompt():
    tokenizer = char_tokenizer(CHATML)
    full, spans = trained_spans(tokenizer, USER_TOO[:2], roles=("user", "assistant"))
    (user_seg_start, _, user_start, user_end), (assistant_seg_start, *_) = spans
    assert full[:user_start] == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert full[user_start:user_end] == "Hello there!<|im_end|>" and user_seg_start == 0
    assert full[:assistant_seg_start].endswith("<|im_start|>assistant\n")


def test_spans_mark_content_and_end_of_turn_only():
    tokenizer = char_tokenizer(CHATML)
    messages = conversation()[:2]
    full, spans = trained_spans(tokenizer, messages)
    (seg_start, seg_end, start, end), = spans
    assert full[seg_start:seg_end] == "Hi! How are you?<|im_end|>\n"
    assert full[start:end] == "Hi! How are you?<|im_end|>"
    assert full[:seg_start].endswith("<|im_start|>assistant\n")


def test_trained_rule_for_tokens_crossing_boundaries():
    span = (10, 30, 12, 28)  # segment [10, 30), trained characters [12, 28)
    assert _trained((12, 15), span)
    assert _trained((10, 15), span)  # leading whitespace merged into the first word: trained
    assert not _trained((8, 15), span)  # merged with the header: untrained
    assert not _trained((10, 12), span)  # whitespace only
    assert not _trained((28, 30), span)  # whitespace after the end-of-turn marker
    assert not _trained((25, 32), span)  # runs past the turn
    assert _trained((20, 20), span) and not _trained((29, 29), span)  # zero-width tokens


def test_template_that_renders_no_assistant_turn():
    with pytest.raises(TemplateError, match="does not render assistant turn"):
        tokenize_with_mask(char_tokenizer(DROPS_ASSISTANT), conversation())


def test_template_that_is_not_prefix_stable():
    with pytest.raises(TemplateError, match="prefix-stable"):
        tokenize_with_mask(char_tokenizer(LAST_TURN_DIFFERENT), conversation())


def test_conversation_without_assistant_turn():
    with pytest.raises(TemplateError, match="no assistant turn"):
        tokenize_with_mask(char_tokenizer(CHATML), [{"role": "user", "content": "Hi"}])


def test_tokenizer_without_chat_template_mentions_the_option():
    tokenizer = char_tokenizer(None)
    with pytest.raises(TemplateError, match="--chat-template FILE"):
        ensure_chat_template(tokenizer)
    assert isinstance(TemplateError("x"), ValueError)  # the CLI prints ValueErrors cleanly


def test_chat_template_file_option(tmp_path):
    tokenizer = char_tokenizer(None)
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3)
    ensure_chat_template(tokenizer, str(path))
    assert tokenizer.chat_template == LLAMA3
    assert render(tokenizer, [{"role": "user", "content": "x"}]).startswith("<|begin_of_text|>")
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        ensure_chat_template(tokenizer, str(tmp_path / "missing.jinja"))
