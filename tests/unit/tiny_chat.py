"""Tiny tokenizers and hand-written chat templates built in-process, for the data-layer tests.

Two tokenizers, both with the special tokens of every template below:
- `char_tokenizer()`: one token per character (exact offsets, nothing merges across boundaries);
- `bpe_tokenizer()`: a byte-level BPE trained here on a few sentences, so words merge with the
  space before them (" Hello" is one token) the way GPT-2/Llama-3/Qwen tokenizers do.

Templates (written for these tests, in the style of the families they are named after):
CHATML (Qwen2.5-like, injects a default system prompt), LLAMA3 (BOS, `| trim`, <|eot_id|>),
MISTRAL ([INST] ... [/INST] then " content</s>", raises on system), GEMMA (raises on system),
GEMMA_FOLD (folds a system message into the first user turn), DROPS_ASSISTANT (renders no
assistant message) and LAST_TURN_DIFFERENT (not prefix-stable).
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<s>", "</s>", "<bos>", "<start_of_turn>", "<end_of_turn>",
]
DEFAULT_SYSTEM = "You are Tiny, a helpful assistant."

CHATML = (
    r"{% if not messages or messages[0].role != 'system' %}"
    r"{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + r"<|im_end|>\n' }}{% endif %}"
    r"{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    r"{{ '<|begin_of_text|>' }}{% for m in messages %}"
    r"{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    r"{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
    r"{% elif m.role == 'assistant' %}{{ ' ' + m.content + eos_token }}"
    r"{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (
    r"{{ '<bos>' }}{% if messages and messages[0].role == 'system' %}"
    r"{{ raise_exception('System role not supported') }}{% endif %}"
    r"{% for m in messages %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
    r"{{ '<start_of_turn>' + role + '\n' + m.content | trim + '<end_of_turn>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_FOLD = (
    r"{{ '<bos>' }}{% if messages and messages[0].role == 'system' %}"
    r"{% set first = messages[0].content + '\n\n' %}{% set rest = messages[1:] %}"
    r"{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    r"{% for m in rest %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
    r"{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m.content | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
DROPS_ASSISTANT = (
    r"{% for m in messages %}{% if m.role != 'assistant' %}"
    r"{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LAST_TURN_DIFFERENT = (
    r"{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
    r"{% if loop.last %}{{ ' (final)' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BPE_CORPUS = [
    "Hello there! How are you today? I am fine, thank you.",
    "The capital of France is Paris. Hello again, hello world.",
    "Tell me a joke about cats. Why did the cat sit on the computer?",
    "Sure! Here is a short poem about the sea and the sky.",
] * 20


def _wrap(tokenizer: Tokenizer, template: str | None) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=[t for t in SPECIAL if t not in ("<s>", "</s>")],
    )
    wrapped.chat_template = template
    return wrapped


def char_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline, tab); the special tokens on top."""
    chars = sorted(set(string.printable))
    vocab = {"<unk>": 0, **{c: k + 1 for k, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer, template)


def bpe_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenisation) trained on `BPE_CORPUS`."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", *SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(BPE_CORPUS, trainer=trainer)
    return _wrap(tokenizer, template)


def save_tokenizer(tokenizer, folder: Path) -> Path:
    """Save as a model folder that `baldeagle.targets.load_tokenizer` accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    return folder


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(tokenizer, ids, mask) -> list[str]:
    """The decoded text of each maximal run of trained tokens (one per assistant turn)."""
    runs, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [decode(tokenizer, run) for run in runs]


def trained_text(tokenizer, ids, mask) -> str:
    return decode(tokenizer, [t for t, m in zip(ids, mask) if m])
