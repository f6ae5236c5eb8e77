"""Offline feature store on the packaged SmolLM2: bytes per token, extraction speed, load time.

    .venv/bin/python benchmarks/feature_store.py --model smollm2 --data /tmp/fs_bench/prepared

Measured in one run, over the same rows, batches and threads:
- bytes per token of the whole store folder (shards + manifest + config) against the raw bf16
  size of what the draft type needs (EAGLE-3: 4H per token; EAGLE-1: H), goal within 2%;
- extraction tokens/s (`run_features`: forward, bf16 copy, streaming shard writes, fsync)
  against a bare target forward over the same batches: the backbone alone (hidden states only,
  the least any extraction must compute) and the full model (with the LM head), goal ≥ 90%;
  passes alternate (bare, extract, bare, extract, ...) so drift on a shared machine hits both;
- store load time: FeatureStore open (manifest + every shard header checked) and reading every
  row, plus OfflineFeatures throughput (features, and logits rebuilt from the LM head at every
  real token: an upper bound, since training asks for them at trained positions only).
Without --data, the chitchat subset is prepared first (`baldeagle prepare --limit 300 --max-length 512`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from baldeagle import cli
from baldeagle.config import FeaturesConfig
from baldeagle.data.prepare import load_prepared
from baldeagle.data.store import DTYPE_NAMES, batch_tensors, run_features, scan_rows
from baldeagle.data.store_layout import plan_shards
from baldeagle.data.store_reader import FeatureStore, OfflineFeatures, load_lm_head, store_size
from baldeagle.targets import load_target
from baldeagle.train.collate import PadCollator


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_pass(model, dataset, plans, max_length: int, full: bool) -> float:
    """Seconds for one forward per planned batch, nothing kept (full: with the LM head)."""
    forward = model if full else model.base_model
    sync(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        for plan in plans:
            for a, b in plan.batches:
                ids, mask = batch_tensors(dataset, plan.rows[a:b], max_length, model.device)
                forward(input_ids=ids, attention_mask=mask, use_cache=False)
    sync(model.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="", help="prepared folder (default: prepare chitchat into --work)")
    parser.add_argument("--work", default="/tmp/fs_bench")
    parser.add_argument("--draft-type", default="eagle3", choices=["eagle3", "eagle1"])
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--shard-tokens", type=int, default=16384)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--limit", type=int, default=0, help="first N prepared rows (0 = all)")
    parser.add_argument("--target-dtype", default="float32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/extract rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default="", help="also write the summary to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = Path(args.data) if args.data else work / "prepared"
    if not data.is_dir():
        assert cli.main(["prepare", "--model", args.model, "--dataset", "chitchat", "--limit", "300",
                         "--max-length", str(args.max_length), "--out", str(data)]) == 0

    cfg = FeaturesConfig(model=args.model, data=str(data), out=str(work / "store"), draft_type=args.draft_type,
                         max_length=args.max_length, batch_tokens=args.batch_tokens, shard_tokens=args.shard_tokens,
                         limit=args.limit, target_dtype=args.target_dtype)
    dataset, _ = load_prepared(str(data))
    lengths = [min(int(n), cfg.max_length) for n in scan_rows(dataset)[0]][: cfg.limit or None]
    plans = plan_shards(list(range(len(lengths))), lengths, cfg.batch_tokens, cfg.shard_tokens)
    tokens = sum(lengths)
    padded = sum((b - a) * p.lengths[a] for p in plans for a, b in p.batches)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_target(cfg.model, DTYPE_NAMES[cfg.target_dtype]).to(device)
    hidden = model.config.hidden_size
    bare_pass(model, dataset, plans if device.type == "cuda" else plans[:1], cfg.max_length, full=False)  # warm-up

    bare, full, extract = [], [], []
    for _ in range(args.rounds):
        bare.append(bare_pass(model, dataset, plans, cfg.max_length, full=False))
        full.append(bare_pass(model, dataset, plans, cfg.max_length, full=True))
        shutil.rmtree(cfg.out, ignore_errors=True)
        summary = run_features(cfg)
        extract.append(summary["seconds"])

    start = time.perf_counter()
    store = FeatureStore(cfg.out)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    checksum = 0.0
    for row in store.row_indices:
        for tensor in store.row(row).values():
            checksum += float(tensor[-1].float().sum())  # touch every row's slice
    read_s = time.perf_counter() - start
    offline = OfflineFeatures(store, load_lm_head(cfg.model).to(device), cfg.draft_type)
    collate = PadCollator(pad_token_id=0, max_length=cfg.max_length)
    start = time.perf_counter()
    for i in range(0, len(store), 8):
        rows = store.row_indices[i : i + 8]
        batch = collate([{"input_ids": dataset[r]["input_ids"], "loss_mask": dataset[r]["loss_mask"]} for r in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["row_index"] = torch.tensor(rows)
        target = offline(batch)
        target.logits[batch["attention_mask"].bool()]  # logits at every real token (training needs fewer)
    sync(device)
    offline_s = time.perf_counter() - start

    raw_per_token = (4 if cfg.draft_type == "eagle3" else 1) * hidden * 2
    size = store_size(cfg.out)
    median = statistics.median
    result = {
        "model": cfg.model, "draft_type": cfg.draft_type, "rows": len(lengths), "tokens": tokens,
        "padded_tokens": padded, "batches": sum(len(p.batches) for p in plans), "shards": len(plans),
        "device": str(device), "target_dtype": cfg.target_dtype, "threads": torch.get_num_threads(),
        "store_bytes": size, "bytes_per_token": size / tokens, "raw_bf16_bytes_per_token": raw_per_token,
        "bytes_vs_raw": size / tokens / raw_per_token,
        "bare_backbone_tok_s": tokens / median(bare), "bare_full_forward_tok_s": tokens / median(full),
        "extract_tok_s": tokens / median(extract),
        "extract_vs_backbone": median(bare) / median(extract),
        "extract_vs_full_forward": median(full) / median(extract),
        "passes_s": {"backbone": bare, "full_forward": full, "extract": extract},
        "open_s": open_s, "read_all_rows_s": read_s, "read_tok_s": tokens / read_s,
        "offline_features_tok_s": tokens / offline_s,
    }
    print(json.dumps(result, indent=2))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    print(f"""
| metric | value |
|---|---|
| rows / tokens (padded) | {len(lengths)} / {tokens} ({padded}) |
| store bytes per token | {result['bytes_per_token']:.1f} (raw bf16 {raw_per_token}: ×{result['bytes_vs_raw']:.4f}) |
| extraction tok/s | {result['extract_tok_s']:.0f} |
| bare backbone forward tok/s | {result['bare_backbone_tok_s']:.0f} (extraction at {pct(result['extract_vs_backbone'])}) |
| full forward (with LM head) tok/s | {result['bare_full_forward_tok_s']:.0f} (extraction at {pct(result['extract_vs_full_forward'])}) |
| store open (manifest + {len(plans)} shard headers) | {1000 * open_s:.1f} ms |
| read every row | {read_s:.2f} s ({result['read_tok_s']:.0f} tok/s) |
| OfflineFeatures (+ logits at every token) | {result['offline_features_tok_s']:.0f} tok/s |
""")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
