"""`baldeagle quickstart`: the whole pipeline on the packaged default model, on a laptop CPU.

Each step is the same stage function the CLI runs, with a config built here; every stage writes
into its own place under `out` and is skipped when its output already exists (a second run is
fast; an interrupted run resumes). This file doubles as the tutorial: read it top to bottom.

    out/data/regenerated.jsonl   the target's own answers to prompts it wrote itself, over kinds of task
    out/prepared/                token ids + assistant-only loss mask      (out/mask.html shows it)
    out/train/                   training checkpoints; out/draft/ is the trained EAGLE-3 draft
    out/score/score.json         the yardstick: chain, fan and tree τ on 40 MT-bench first turns, teacher-forced
    out/eval/eval.json           MT-bench (held out), tree mode, plus acceptance.png
    out/eval/chain/eval.json     the same with the shape (chain k, fan w or depth-2 tree) chosen from measured costs and the score
    out/export/{vllm,sglang,speculators}/   what each engine loads, with its serving command
    out/summary.json, out/summary.md
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from importlib import resources
from pathlib import Path

from baldeagle.config import (
    ConfigError,
    EvalConfig,
    ExportConfig,
    ScoreConfig,
    PrepareConfig,
    QuickstartConfig,
    RegenerateConfig,
    TrainConfig,
    ViewConfig,
    load_config,
)

logger = logging.getLogger(__name__)

# The quickstart's training settings ship inside the package (package data), so an installed
# baldeagle finds them as the checkout does: src/baldeagle/configs/quickstart.yaml.
QUICKSTART_TRAIN = Path(str(resources.files("baldeagle") / "configs" / "quickstart.yaml"))
REGENERATE_SHARE, TRAIN_SHARE = 0.25, 0.40  # of --minutes; the rest: loading, prepare, eval, export
MIN_TRAIN_MINUTES = 0.5
K = 3  # the longest chain eval may choose, the yardstick's k, and the k written into the serving commands
TREE = {"tree_depth": 4, "tree_topk": 2, "tree_total_tokens": 8}  # on a CPU, verifying 8 tokens costs ~1.05x one


def _stage(name: str, done: Path, timings: dict, run) -> None:
    if done.exists():
        logger.info("quickstart: %s: already done (%s)", name, done)
        timings[name] = 0.0
        return
    logger.info("quickstart: %s ...", name)
    start = time.monotonic()
    run()
    timings[name] = round(time.monotonic() - start, 1)


def training_target_dtype() -> str:
    """bfloat16 for the frozen target during training where the hardware computes it natively.

    On this project's CPU (avx512_bf16) it makes a training step about 1.45x faster and the draft
    learns the same (BENCHMARKS.md, "Training throughput"); where bf16 would be emulated, float32.
    Regeneration and eval keep the target in float32: they produce the target's exact outputs.
    """
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def check_budget(cfg: QuickstartConfig) -> None:
    if cfg.minutes * TRAIN_SHARE < MIN_TRAIN_MINUTES:
        raise ValueError(
            f"--minutes {cfg.minutes} is too small to train a useful draft: training gets {TRAIN_SHARE:.0%} of it "
            f"({cfg.minutes * TRAIN_SHARE:.2f} min) and needs at least {MIN_TRAIN_MINUTES} min; "
            f"use --minutes {MIN_TRAIN_MINUTES / TRAIN_SHARE:g} or more"
        )
    if cfg.conversations < 0 or cfg.self_prompts < 0 or (cfg.conversations == 0 and cfg.self_prompts == 0):
        raise ValueError("quickstart needs prompts: --conversations and/or --self-prompts above 0")


def quickstart_train_config(cfg: QuickstartConfig) -> TrainConfig:
    """The training stage's config: the packaged quickstart.yaml, then the quickstart's own settings."""
    if not QUICKSTART_TRAIN.is_file():
        raise ConfigError(f"the quickstart's training config {QUICKSTART_TRAIN} is missing: the installed "
                          "baldeagle package lacks its package data (configs/*.yaml); reinstall it")
    root = Path(cfg.out)
    return load_config(TrainConfig, QUICKSTART_TRAIN, ("quickstart", {
        "model": cfg.model, "data": str(root / "prepared"), "out": str(root / "train"), "max_length": cfg.max_length,
        "max_minutes": cfg.minutes * TRAIN_SHARE, "overwrite": True, "target_dtype": training_target_dtype(),
        # The draft's matmuls under bfloat16 autocast where bf16 is native (weights and optimizer stay float32):
        # 1.2-1.25x the steps, +0.005/+0.008 τ in two paired rounds (BENCHMARKS.md "Cheaper steps").
        "bf16": training_target_dtype() == "bfloat16",
        # The clock ends training, not the epoch count: a small regenerated set is seen several times.
        "num_train_epochs": 50, "lr_scheduler_type": "constant_with_warmup", "warmup_steps": 20}))


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from baldeagle.data.prepare import run_prepare
    from baldeagle.data.regenerate import run_regenerate
    from baldeagle.data.view import run_view
    from baldeagle.decode.evaluate import run_eval
    from baldeagle.decode.score import run_score
    from baldeagle.export import run_export
    from baldeagle.train.run import run_train

    check_budget(cfg)
    root = Path(cfg.out)
    regenerated, prepared, draft = root / "data" / "regenerated.jsonl", root / "prepared", root / "draft"
    timings: dict[str, float] = {}

    # 1. The target writes prompts over kinds of task (code, maths, writing, ...) and answers them;
    #    --conversations N adds N of --dataset's conversations. MT-bench is held out.
    _stage("regenerate", regenerated.with_name(regenerated.name + ".stats.json"), timings,
           lambda: run_regenerate(RegenerateConfig(
               model=cfg.model, dataset=cfg.dataset if cfg.conversations else "", out=str(regenerated),
               limit=cfg.conversations, shuffle=True, max_turns=cfg.max_turns, self_prompts=cfg.self_prompts,
               self_prompt_openings=cfg.self_prompt_openings,
               max_new_tokens=cfg.max_new_tokens, chunk_size=32, max_minutes=cfg.minutes * REGENERATE_SHARE)))
    # 2. Conversations → token ids + a loss mask of the answers (and the prompts with
    #    train_user_turns), with the target's chat template.
    _stage("prepare", prepared / "stats.json", timings, lambda: run_prepare(PrepareConfig(
        model=cfg.model, dataset=str(regenerated), out=str(prepared), max_length=cfg.max_length,
        train_user_turns=cfg.train_user_turns, overwrite=True)))
    # 3. Look at what will be trained: the loss mask over the text, in the terminal and as HTML.
    run_view(ViewConfig(data=str(prepared), rows=1, max_tokens=120, html=str(root / "mask.html")))
    # 4. Train an EAGLE-3 draft with the target online, for a fixed share of the budget.
    train_cfg = quickstart_train_config(cfg)
    _stage("train", draft / "model.safetensors", timings, lambda: _train_into(train_cfg, draft, run_train))
    # 5. The yardstick: chain acceptance on MT-bench first turns, teacher-forced on the target's
    #    cached greedy answers (made once, reused by every later run), in seconds per draft.
    score_out = root / "score"
    _stage("score", score_out / "score.json", timings, lambda: run_score(ScoreConfig(
        model=cfg.model, draft=str(draft), out=str(score_out), limit=cfg.score_prompts,
        max_new_tokens=cfg.score_new_tokens, num_draft_tokens=K)))
    # 6. What the draft buys: speculative vs plain decoding on held-out MT-bench prompts, exact. The
    #    chain eval decodes with the shape (a chain of 1..K, a depth-1 fan of the draft's best first
    #    guesses, or a depth-2 tree) the yardstick's acceptance and this machine's measured step costs predict to
    #    be fastest (baldeagle.decode.cost).
    evals = {"tree": root / "eval", "chain": root / "eval" / "chain"}
    for mode, out in evals.items():
        eval_cfg = EvalConfig(model=cfg.model, draft=str(draft), out=str(out), mode=mode, num_draft_tokens=K,
                              limit=cfg.eval_prompts, first_turn_only=True, max_new_tokens=cfg.eval_new_tokens,
                              prompt_lookup=mode == "chain", timing_repeats=1,  # beside the chosen shape
                              choose_shape_from=str(score_out / "score.json") if mode == "chain" else "", **TREE)
        _stage(f"eval ({mode})", out / "eval.json", timings, lambda eval_cfg=eval_cfg: run_eval(eval_cfg))
    # 7. Export for the serving engines; each folder's README.md holds the exact serving command.
    for fmt in ("vllm", "sglang", "speculators"):
        export_cfg = ExportConfig(draft=str(draft), format=fmt, out=str(root / "export" / fmt),
                                  num_speculative_tokens=K)
        _stage(f"export ({fmt})", root / "export" / fmt / "config.json", timings,
               lambda export_cfg=export_cfg: run_export(export_cfg))

    # 8. The summary: summary.md (printed) and summary.json.
    return _write_summary(root, evals, score_out, timings, regenerated, draft, train_cfg.target_dtype)


def _write_summary(root: Path, evals: dict, score_out: Path, timings: dict, regenerated: Path, draft: Path,
                   target_dtype: str) -> dict:
    """Print and write summary.md; write and return summary.json's dict."""
    results = {mode: json.loads((out / "eval.json").read_text()) for mode, out in evals.items()}
    score = json.loads((score_out / "score.json").read_text())
    report = summary(results, score, timings, root)
    print(report, flush=True)
    (root / "summary.md").write_text(report + "\n")
    data_stats = json.loads(regenerated.with_name(regenerated.name + ".stats.json").read_text())
    result = {"eval": {m: {k: r[k] for k in SUMMARY_KEYS} for m, r in results.items()}, "seconds": timings,
              "score": {k: score[k] for k in ("acceptance_length", "per_position_acceptance", "per_category",
                                              "num_prompts", "num_draft_tokens")},
              "regenerated": {k: data_stats[k] for k in ("rows_total", "self_prompts", "generated_tokens")},
              "train": {**_train_metrics(draft), "target_dtype": target_dtype}}
    if "chain" in results:  # the shape eval chose
        choice = results["chain"]["shape_choice"]
        result["eval"]["chain"].update(shape=choice["chosen"], num_draft_tokens=choice["drafted"])
    (root / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _train_into(train_cfg: TrainConfig, draft: Path, run_train) -> None:
    """Train into `train_cfg.out`, then copy the final draft to `draft` (complete, or not at all)."""
    run_train(train_cfg)
    partial = draft.with_name(draft.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(Path(train_cfg.out) / "final", partial)
    shutil.rmtree(draft, ignore_errors=True)
    partial.rename(draft)


def _train_metrics(draft: Path) -> dict:
    metrics = json.loads((draft / "metrics.json").read_text()) if (draft / "metrics.json").is_file() else {}
    history = metrics.get("log_history") or []
    steps = max((row.get("step", 0) for row in history), default=0)
    return {"steps": steps, "eval": metrics.get("eval", {}), "eval_before_training": metrics.get("eval_before_training", {})}


SUMMARY_KEYS = ("acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
                "speedup", "prompt_lookup_tokens_per_second", "speedup_vs_prompt_lookup", "outputs_match_baseline",
                "num_prompts", "new_tokens")


def summary(results: dict, score: dict, timings: dict, root: Path) -> str:
    lines = ["", "quickstart summary: MT-bench first turns (held out), greedy; speculative output vs plain decoding",
             "| mode | acceptance length | tokens/s | plain tokens/s | speedup | outputs identical |",
             "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        name = f"{r['shape_choice']['chosen']} (chosen)" if r.get("shape_choice") else mode
        lines.append(f"| {name} | {r['acceptance_length']:.2f} | {r['tokens_per_second']:.1f} | "
                     f"{r['baseline_tokens_per_second']:.1f} | {r['speedup']:.2f}x | {r['outputs_match_baseline']} |")
    chosen = results.get("chain", {})
    if chosen.get("prompt_lookup_tokens_per_second"):  # timed in the same run as the chosen shape
        lines.append(f"prompt lookup decoding (no draft): {chosen['prompt_lookup_tokens_per_second']:.1f} tokens/s; "
                     f"{chosen['shape_choice']['chosen']} is {chosen['speedup_vs_prompt_lookup']:.2f}x of it")
    categories = ", ".join(f"{name} {row['acceptance_length']:.2f}" for name, row in score["per_category"].items())
    lines.append(f"yardstick, {score['num_prompts']} MT-bench first turns, chain k={score['num_draft_tokens']} "
                 f"(teacher-forced, baldeagle score): τ {score['acceptance_length']:.3f} ({categories})")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
                 + f" (total {sum(timings.values()) / 60:.1f} min)")
    lines.append(f"written: {root}/data/regenerated.jsonl, {root}/prepared, {root}/mask.html, {root}/draft, "
                 f"{root}/eval/eval.json (+ acceptance.png, chain/), {root}/score/score.json, "
                 f"{root}/export/{{vllm,sglang,speculators}}")
    lines.append(f"serve it: see {root}/export/vllm/README.md and {root}/export/sglang/README.md")
    return "\n".join(lines)
