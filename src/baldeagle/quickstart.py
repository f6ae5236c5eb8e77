"""`baldeagle quickstart`: the pipeline on the packaged default model, on a laptop CPU, in minutes.

Each step is the same stage function the CLI runs, with a config built here; outputs land in one
folder per stage under `out`, and a stage whose output already exists is skipped (a second run is
fast; an interrupted run resumes). This file doubles as the tutorial: read it top to bottom.
"""

from __future__ import annotations

import time
from pathlib import Path

from baldeagle.config import EvalConfig, PrepareConfig, QuickstartConfig, TrainConfig, ViewConfig, load_config

QUICKSTART_TRAIN = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def _stage(name: str, done: Path, timings: dict, run) -> None:
    if done.exists():
        print(f"quickstart: {name}: already done ({done})")
        timings[name] = 0.0
        return
    print(f"\nquickstart: {name} ...", flush=True)
    start = time.monotonic()
    run()
    timings[name] = time.monotonic() - start


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from baldeagle.data.prepare import run_prepare
    from baldeagle.data.view import run_view
    from baldeagle.decode.bench import run_eval
    from baldeagle.train.run import run_train

    root = Path(cfg.out)
    prepared, draft, evals = root / "prepared", root / "draft", root / "eval"
    timings: dict[str, float] = {}

    # 1. Conversations → token ids + assistant-only loss mask, with the target's chat template.
    _stage("prepare", prepared / "stats.json", timings, lambda: run_prepare(PrepareConfig(
        model=cfg.model, dataset=cfg.dataset, out=str(prepared), limit=cfg.limit, shuffle=True,
        max_length=cfg.max_length, overwrite=True)))
    # 2. Look at what will be trained: the loss mask over the text, in the terminal and as HTML.
    run_view(ViewConfig(data=str(prepared), rows=1, max_tokens=120, html=str(root / "mask.html")))
    # 3. Train an EAGLE-3 draft with the target online, for a fixed time budget.
    train_cfg = load_config(TrainConfig, QUICKSTART_TRAIN if QUICKSTART_TRAIN.is_file() else None, ("quickstart", {
        "model": cfg.model, "data": str(prepared), "out": str(draft), "max_length": cfg.max_length,
        "max_minutes": cfg.train_minutes, "overwrite": True}))
    _stage("train", draft / "final" / "model.safetensors", timings, lambda: run_train(train_cfg))
    # 4. What the draft buys: speculative vs plain decoding on held-out MT-bench prompts, exact.
    results = {}
    for mode in ("chain", "tree"):
        out = evals / mode
        eval_cfg = EvalConfig(model=cfg.model, draft=str(draft / "final"), out=str(out), mode=mode,
                              limit=cfg.eval_prompts, first_turn_only=True, max_new_tokens=cfg.max_new_tokens,
                              num_draft_tokens=3, tree_depth=4, tree_topk=2, tree_total_tokens=8)
        # Small trees: on a CPU, verifying 24 tokens costs ~2x a one-token forward; 8 cost ~1.05x.
        _stage(f"eval ({mode})", out / "eval.json", timings, lambda: run_eval(eval_cfg))
        results[mode] = _read(out / "eval.json")
    print(summary(results, timings, root))
    return {"eval": results, "seconds": timings}


def _read(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def summary(results: dict, timings: dict, root: Path) -> str:
    lines = ["", "quickstart summary (MT-bench first turns, greedy, outputs identical to plain decoding)",
             "| mode | acceptance length | tokens/s | plain tokens/s | speedup | outputs match |",
             "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['acceptance_length']:.2f} | {r['tokens_per_second']:.1f} | "
                     f"{r['baseline_tokens_per_second']:.1f} | {r['speedup']:.2f}x | {r['outputs_match_baseline']} |")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    lines.append(f"outputs: {root}/prepared, {root}/mask.html, {root}/draft/final, {root}/eval/<mode>/eval.json")
    return "\n".join(lines)
