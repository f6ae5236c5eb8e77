"""Levers on draft quality, judged on the yardstick at equal training wall clock, side by side.

Each variant is the quickstart's training (src/baldeagle/configs/quickstart.yaml plus the quickstart's own
overrides: constant LR after 20 warm-up steps, the clock ends training) with `key=value` changes,
e.g. another prepared dataset or draft vocabulary. Variants run --parallel at a time, each on
--threads CPU threads, so the ones compared in one round share the machine equally; each trains
--minutes, then `baldeagle score` (the yardstick: chain τ on MT-bench first turns, teacher-forced,
float32) scores its draft. Results: OUT/levers.json and a markdown table (also printed).

    python benchmarks/levers.py --minutes 12 \
        --variant baseline:data=runs/qs/prepared --variant chitchat:data=runs/data/chitchat3000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from baldeagle.config import ScoreConfig
from baldeagle.decode.score import run_score
from baldeagle.quickstart import QUICKSTART_TRAIN, training_target_dtype

REPO = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name:key=value,key=value` → (name, ["key=value", ...])."""
    name, _, changes = text.partition(":")
    return name, [c for c in changes.split(",") if c]


def train_command(args, name: str, changes: list[str]) -> list[str]:
    base = [f"model={args.model}", f"out={Path(args.out) / name / 'train'}", f"max_minutes={args.minutes}",
            "num_train_epochs=1000", "lr_scheduler_type=constant_with_warmup", "warmup_steps=20",
            f"target_dtype={training_target_dtype()}", f"bf16={training_target_dtype() == 'bfloat16'}",
            "overwrite=true", "save_steps=100000"]
    return [sys.executable, "-m", "baldeagle.cli", "train", "--config", str(QUICKSTART_TRAIN), *base, *changes]


def run_round(args, variants: list[tuple[str, list[str]]]) -> None:
    """Train these variants at the same time, each on args.threads threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    running = []
    for name, changes in variants:
        folder = Path(args.out) / name
        if (folder / "train" / "final" / "model.safetensors").is_file():
            print(f"{name}: already trained", flush=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "train.log", "w")
        print(f"{name}: training {args.minutes} min: {' '.join(changes)}", flush=True)
        running.append((name, log, subprocess.Popen(train_command(args, name, changes), stdout=log,
                                                    stderr=subprocess.STDOUT, env=env, cwd=REPO)))
    for name, log, process in running:
        if process.wait() != 0:
            sys.exit(f"{name}: training failed, see {log.name}")
        log.close()


def result_of(args, name: str, changes: list[str]) -> dict:
    folder = Path(args.out) / name
    metrics = json.loads((folder / "train" / "final" / "metrics.json").read_text())
    logged = [h for h in metrics["log_history"] if "train_minutes" in h]
    start = time.perf_counter()
    score = run_score(ScoreConfig(model=args.model, draft=str(folder / "train" / "final"), out=str(folder / "score"),
                                  prompts=args.prompts, limit=args.limit, max_new_tokens=args.new_tokens,
                                  num_draft_tokens=args.k))
    return {"variant": name, "changes": changes, "steps": max((h.get("step", 0) for h in logged), default=0),
            "train_minutes": logged[-1]["train_minutes"] if logged else None,
            "target_tokens": logged[-1]["target_tokens"] if logged else None,
            "held_out_tau_sim": metrics["eval"].get("eval_tau_sim"), "tau": score["acceptance_length"],
            "per_position": score["per_position_acceptance"],
            "categories": {k: v["acceptance_length"] for k, v in score["per_category"].items()},
            "score_seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    names = sorted({c for r in rows for c in r["categories"]})
    lines = ["| variant | steps | target tokens | held-out τ_sim | MT-bench τ | " + " | ".join(names) + " |",
             "|---" * (5 + len(names)) + "|"]
    for r in rows:
        sim = f"{r['held_out_tau_sim']:.3f}" if r["held_out_tau_sim"] else "-"
        lines.append(f"| {r['variant']} | {r['steps']} | {r['target_tokens']} | {sim} | **{r['tau']:.3f}** | "
                     + " | ".join(f"{r['categories'].get(n, 0):.2f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="name:key=value,key=value")
    parser.add_argument("--minutes", type=float, default=12.0, help="training wall clock per variant")
    parser.add_argument("--parallel", type=int, default=2, help="variants trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per variant")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", default="mtbench")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--out", default="runs/levers")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    for start in range(0, len(variants), args.parallel):
        run_round(args, variants[start:start + args.parallel])
    rows = [result_of(args, name, changes) for name, changes in variants]
    Path(args.out, "levers.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{args.minutes} min of training each, {args.parallel} at a time on {args.threads} thread(s); "
          f"yardstick: {args.prompts} first turns (limit {args.limit or 'all'}), {args.new_tokens} tokens, k={args.k}")
    print(table(rows))


if __name__ == "__main__":
    main()
