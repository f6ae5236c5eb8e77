"""Does the yardstick (`baldeagle score`) agree with real chain decoding (`baldeagle eval --mode chain`)?

For each draft, the same prompts (MT-bench first turns spread over its categories), the same k and
answer length: the yardstick's teacher-forced τ beside eval's decoded τ, their difference, and
the time each took. Drafts of clearly different quality come from the command line (`--draft
LABEL=DIR`), plus two made here on the same target and data when asked:
  --untrained DATA   a draft that has not learnt anything (one step at learning rate ~0 on DATA)
  --memorised MIN    a draft trained MIN minutes on the yardstick's own cached answers (high τ)

    python benchmarks/yardstick_parity.py --draft quickstart=runs/qs/draft --untrained runs/qs/prepared \
        --memorised 4 --limit 16 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from baldeagle.config import EvalConfig, ScoreConfig, TrainConfig, load_config
from baldeagle.decode.evaluate import run_eval
from baldeagle.decode.score import run_score
from baldeagle.quickstart import QUICKSTART_TRAIN
from baldeagle.train.run import run_train


def train_draft(model: str, data: Path, out: Path, **changes) -> Path:
    cfg = load_config(TrainConfig, QUICKSTART_TRAIN, ("parity", {
        "model": model, "data": str(data), "out": str(out), "overwrite": True, "eval_fraction": 0.0,
        "save_steps": 100000, "logging_steps": 50, **changes}))
    if not (out / "final" / "model.safetensors").is_file():
        run_train(cfg)
    return out / "final"


def answers_as_prepared(answers_dir: Path, out: Path) -> Path:
    """The yardstick's cached answers as a prepared dataset (loss on the answer tokens)."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (answers_dir / "answers.jsonl").read_text().splitlines() if line.strip()]
    ids = [r["prompt"] + r["answer"] for r in rows]
    mask = [[0] * len(r["prompt"]) + [1] * len(r["answer"]) for r in rows]
    Dataset.from_dict({"input_ids": ids, "loss_mask": mask}).save_to_disk(str(out))
    (out / "stats.json").write_text(json.dumps({"rows_in": len(ids), "rows_kept": len(ids),
                                                 "trained_tokens": sum(map(sum, mask))}))
    return out


def measure(label: str, draft: Path, args, out: Path) -> dict:
    common = dict(model=args.model, draft=str(draft), prompts=args.prompts, limit=args.limit,
                  max_new_tokens=args.max_new_tokens, num_draft_tokens=args.k)
    start = time.perf_counter()
    score = run_score(ScoreConfig(**common, out=str(out / label / "score")))
    score_seconds = time.perf_counter() - start
    start = time.perf_counter()
    evaluated = run_eval(EvalConfig(**common, out=str(out / label / "eval"), mode="chain", first_turn_only=True,
                                    prompt_lookup=False, **({"timing_repeats": 1} if args.timing_field else {})))
    eval_seconds = time.perf_counter() - start
    return {"label": label, "score": score["acceptance_length"], "eval": evaluated["acceptance_length"],
            "score_seconds": score_seconds, "eval_seconds": eval_seconds,
            "turns": evaluated["num_turns"], "identical": evaluated["outputs_match_baseline"],
            "score_categories": {k: v["acceptance_length"] for k, v in score["per_category"].items()},
            "eval_categories": {k: v["acceptance_length"] for k, v in evaluated["per_category"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", action="append", default=[], help="LABEL=DIR (repeatable)")
    parser.add_argument("--untrained", default="", help="prepared data for an untrained draft's vocabulary")
    parser.add_argument("--memorised", type=float, default=0.0, help="minutes to train a draft on the answers")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", default="mtbench")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_parity")
    args = parser.parse_args()
    args.timing_field = "timing_repeats" in EvalConfig.__dataclass_fields__
    out = Path(args.out)
    drafts = dict(item.split("=", 1) for item in args.draft)
    if args.untrained:
        drafts["untrained"] = train_draft(args.model, Path(args.untrained), out / "untrained",
                                          max_steps=1, learning_rate=1e-12)
    if args.memorised:
        first = next(iter(drafts.values()))
        score = run_score(ScoreConfig(model=args.model, draft=str(first), prompts=args.prompts, limit=args.limit,
                                      max_new_tokens=args.max_new_tokens, num_draft_tokens=args.k,
                                      out=str(out / "answers-probe")))
        data = out / "memorise-data"
        if not data.exists():
            answers_as_prepared(Path(score["answers"]), data)
        drafts["memorised"] = train_draft(args.model, data, out / "memorised", max_minutes=args.memorised,
                                          num_train_epochs=1000, lr_scheduler_type="constant", warmup_steps=0)
    rows = [measure(label, Path(path), args, out) for label, path in drafts.items()]
    (out / "parity.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{args.limit} MT-bench first turns, chain k={args.k}, {args.max_new_tokens} new tokens")
    print("| draft | yardstick τ | eval chain τ | difference | yardstick s | eval s | outputs identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        diff = (r["score"] - r["eval"]) / r["eval"]
        print(f"| {r['label']} | {r['score']:.3f} | {r['eval']:.3f} | {diff:+.1%} | {r['score_seconds']:.0f} | "
              f"{r['eval_seconds']:.0f} | {r['identical']} |")
    worst = max(abs(r["score"] - r["eval"]) / r["eval"] for r in rows)
    print(f"largest difference {worst:.1%}; median {np.median([abs(r['score'] - r['eval']) / r['eval'] for r in rows]):.1%}")


if __name__ == "__main__":
    main()
