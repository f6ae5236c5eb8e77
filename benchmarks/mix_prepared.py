"""Concatenate prepared datasets, each repeated a whole number of times, into one prepared folder.

    python benchmarks/mix_prepared.py --out runs/data/mix runs/qs/prepared:4 runs/data/chitchat3000:1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import concatenate_datasets, load_from_disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", help="FOLDER:REPEATS")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pieces, stats = [], {"rows_in": 0, "rows_kept": 0, "tokens": 0, "trained_tokens": 0, "parts": args.parts}
    for part in args.parts:
        folder, _, repeats = part.rpartition(":")
        data = load_from_disk(folder).select_columns(["input_ids", "loss_mask"])
        pieces += [data] * int(repeats)
        for _ in range(int(repeats)):
            stats["rows_kept"] += len(data)
            stats["tokens"] += sum(map(len, data["input_ids"]))
            stats["trained_tokens"] += sum(map(sum, data["loss_mask"]))
    stats["rows_in"] = stats["rows_kept"]
    concatenate_datasets(pieces).save_to_disk(args.out)
    Path(args.out, "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{stats['rows_kept']} rows, {stats['trained_tokens']} trained tokens → {args.out}")


if __name__ == "__main__":
    main()
