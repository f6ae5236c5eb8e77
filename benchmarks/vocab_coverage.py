"""How much of the target's greedy output a draft vocabulary can ever draft, per MT-bench category.

An EAGLE-3 draft predicts over N ids chosen by frequency in its training rows
(`baldeagle.model.vocab`); a target token outside them can never be accepted, so coverage of the
target's own greedy answers bounds every draft position's acceptance. This script builds the
vocabulary exactly as training does (`count_trained_tokens` → `build_draft_vocab`) from each
prepared dataset at each size, and counts the share of the yardstick's cached answer tokens (the
target's greedy answers to MT-bench first turns, made by `baldeagle score`) that falls inside it.

    python benchmarks/vocab_coverage.py --data runs/data/qs-regen192 --data runs/data/chitchat3000 \
        --answers ~/.cache/baldeagle/answers/<key> --sizes 2048,4096,8192,16384,32768 --out runs/vocab_coverage.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from baldeagle.data.prepare import load_prepared
from baldeagle.io import atomic_write_json
from baldeagle.model.vocab import build_draft_vocab, count_trained_tokens


def read_cached_answers(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{folder}/answers.jsonl holds no answer")
    return rows


def coverage_by_category(answers: list[dict], in_vocab: torch.Tensor) -> dict[str, float]:
    hits, totals = defaultdict(int), defaultdict(int)
    for row in answers:
        ids = torch.tensor(row["answer"], dtype=torch.long)
        for key in (row.get("category", "?"), "all"):
            hits[key] += int(in_vocab[ids].sum())
            totals[key] += ids.numel()
    return {key: round(hits[key] / totals[key], 4) for key in sorted(totals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="a prepared dataset folder (repeatable)")
    parser.add_argument("--answers", required=True, help="a yardstick answer cache folder (answers.jsonl)")
    parser.add_argument("--sizes", default="2048,4096,8192,16384,32768")
    parser.add_argument("--vocab-size", type=int, default=49152, help="the target's vocabulary size")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    answers = read_cached_answers(Path(args.answers).expanduser())
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for data in args.data:
        rows, _ = load_prepared(data)
        counts = count_trained_tokens(rows, args.vocab_size)
        seen = int((counts > 0).sum())
        for size in sizes:
            _, t2d, _ = build_draft_vocab(counts, size)
            cover = coverage_by_category(answers, t2d)
            results.append({"data": data, "trained_tokens": int(counts.sum()), "distinct_trained_ids": seen,
                            "draft_vocab_size": size, "coverage": cover})
            print(f"{data}: N={size:>6} (distinct trained ids {seen}): all {cover['all']:.3f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in cover.items() if k != "all"), flush=True)
    atomic_write_json(Path(args.out), {"answers": str(args.answers), "answer_tokens": sum(len(r["answer"]) for r in answers),
                                       "results": results})


if __name__ == "__main__":
    main()
