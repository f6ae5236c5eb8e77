"""A draft checkpoint folder: `draft_config.json` + `model.safetensors` (every tensor, no pickle).

The folder is what `eval`, `export` and `train --resume` read. Frozen copies of the target's
embedding (and EAGLE-1's LM head) are included, so a draft loads without its target.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from baldeagle.io import check_safetensors
from baldeagle.model import draft_config
from baldeagle.model.eagle1 import Eagle1Draft
from baldeagle.model.eagle3 import Eagle3Draft

WEIGHTS_NAME = "model.safetensors"
DRAFT_CLASSES = {"eagle1": Eagle1Draft, "eagle3": Eagle3Draft}


def build_draft(cfg: draft_config.DraftConfig):
    return DRAFT_CLASSES[cfg.draft_type](cfg)


def save_draft(draft, folder: str | Path, state_dict: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    draft_config.save(draft.config, folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state_dict or draft.state_dict()).items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "draft_type": draft.config.draft_type})
    return folder


def load_draft(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               expected_type: str | None = None, target_config=None):
    """Rebuild a draft from its folder; `expected_type` guards against resuming the wrong kind,
    `target_config` (the target's config) against a draft made for another target."""
    folder = Path(folder)
    cfg = draft_config.load(folder)
    if expected_type and cfg.draft_type != expected_type:
        raise ValueError(f"{folder} holds an {cfg.draft_type} draft, but {expected_type} was asked for")
    if target_config is not None:
        draft_config.check_fits_target(cfg, target_config, f"the draft in {folder}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    check_safetensors(weights)
    draft = build_draft(cfg)
    state = load_file(str(weights))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit an {cfg.draft_type} draft: missing {missing}, unexpected {unexpected}")
    draft.freeze_target_copies()
    return draft.to(device=device, dtype=dtype) if dtype else draft.to(device)
