"""`baldeagle quickstart`: the pipeline on the packaged default model, on a laptop CPU, in minutes.

Each step is the same stage function the CLI runs, with a config built here; outputs land in one
folder per stage under `out`. This file doubles as the tutorial: read it top to bottom.
"""

from __future__ import annotations

from pathlib import Path

from baldeagle.config import PrepareConfig, QuickstartConfig, ViewConfig


def run_quickstart(cfg: QuickstartConfig) -> dict:
    root = Path(cfg.out)
    from baldeagle.data.prepare import run_prepare
    from baldeagle.data.view import run_view

    # 1. Conversations → token ids + assistant-only loss mask, with the target's chat template.
    prepared = root / "prepared"
    stats = run_prepare(PrepareConfig(model=cfg.model, dataset=cfg.dataset, out=str(prepared),
                                      limit=cfg.limit, max_length=cfg.max_length, overwrite=cfg.overwrite))
    # 2. Look at what will be trained: the loss mask over the text, in the terminal and as HTML.
    run_view(ViewConfig(data=str(prepared), rows=2, max_tokens=160, html=str(root / "mask.html")))
    print(f"\nquickstart: prepared data in {prepared}; loss mask page at {root / 'mask.html'}")
    return {"prepare": stats}
