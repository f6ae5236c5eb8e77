"""`baldeagle score`: a draft's chain acceptance on a prompt set, from the yardstick, in seconds.

The target answers the prompts once (cached); every later score of any draft for that target is
one target forward for the features and one k-step draft pass per answer. `score.json` holds the
acceptance part of eval.json's keys (acceptance_length, per_position_acceptance, per_category,
num_prompts) plus `acceptance_length_every_position` (every answer position as a chain start) and
`fan_acceptance_length` (τ of a depth-1 fan of the draft's 1..8 best first guesses) and
`tree_acceptance_length` (τ of depth-2 EAGLE-2 trees: topk first guesses, 1..topk second guesses).
"""

from __future__ import annotations

import logging

from pathlib import Path

from baldeagle.config import ScoreConfig, to_dict, write_resolved
from baldeagle.conventions import check_full_attention, torch_dtype
from baldeagle.decode.yardstick import MAX_CHAIN, YardstickSettings, build_yardstick

logger = logging.getLogger(__name__)


def check_settings(cfg: ScoreConfig) -> None:
    if not 1 <= cfg.num_draft_tokens <= MAX_CHAIN:
        raise ValueError(f"num_draft_tokens must be in 1..{MAX_CHAIN}, got {cfg.num_draft_tokens}")
    if cfg.max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be at least 2, got {cfg.max_new_tokens}")
    torch_dtype(cfg.target_dtype)


def run_score(cfg: ScoreConfig) -> dict:
    from baldeagle.decode.evaluate import check_compatible
    from baldeagle.io import atomic_write_json, provenance
    from baldeagle.model.checkpoint import load_draft
    from baldeagle.targets import load_target, load_tokenizer, target_config_or_none

    check_settings(cfg)
    target_config = target_config_or_none(cfg.model)  # the config alone, before any work
    if target_config is not None:
        check_full_attention(target_config, cfg.model)
    dtype = torch_dtype(cfg.target_dtype)
    draft = load_draft(cfg.draft, dtype=dtype).eval()
    target = load_target(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    warnings = check_compatible(target, load_tokenizer(cfg.model, cfg.trust_remote_code), draft, cfg.model)
    for warning in warnings:
        logger.warning("%s", warning)
    settings = YardstickSettings(prompts=cfg.prompts, limit=cfg.limit, max_new_tokens=cfg.max_new_tokens,
                                 answers=cfg.answers, dtype=cfg.target_dtype, batch_size=cfg.batch_size)
    stick = build_yardstick(cfg.model, draft.config, settings, target=target, trust_remote_code=cfg.trust_remote_code)
    result = stick.score(draft, cfg.num_draft_tokens)
    result.update(skipped_prompts=stick.skipped_prompts, answers=str(stick.folder), warnings=warnings,
                  settings=to_dict(cfg), provenance=provenance())
    out = Path(cfg.out)
    atomic_write_json(out / "score.json", result)
    write_resolved(cfg, out)
    print(format_score(result), flush=True)
    return result


def format_score(result: dict) -> str:
    lines = [f"{result['num_prompts']} prompts, chain k={result['num_draft_tokens']}, teacher-forced on the "
             f"target's greedy answers ({result['verification_steps']} verification steps)",
             f"  acceptance length τ      {result['acceptance_length']:.3f}",
             "  per-position acceptance  " + " ".join(f"{a:.2f}" for a in result["per_position_acceptance"]),
             f"  τ at every position      {result['acceptance_length_every_position']:.3f}",
             "  fan of w first guesses   " + " ".join(f"w={w} τ {t:.3f}" for w, t in
                                                   enumerate(result["fan_acceptance_length"], 1))]
    trees = result.get("tree_acceptance_length", [])
    for topk in sorted({t["topk"] for t in trees}):
        lines.append(f"  depth-2 tree, topk {topk}   " + " ".join(
            f"n={t['total_tokens']} τ {t['tau']:.3f}" for t in trees if t["topk"] == topk))
    for name, row in result["per_category"].items():
        lines.append(f"    {name:<12} τ {row['acceptance_length']:.3f}  ({row['prompts']} prompts)")
    return "\n".join(lines)
