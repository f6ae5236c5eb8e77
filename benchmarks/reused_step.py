"""What one training step on a reused row costs (the quickstart's steps after its first epoch), by part
of the recipe: the target's labels from the full LM head or from the draft vocabulary's rows plus the kept
full-vocabulary statistics, the draft in float32 or under bfloat16 autocast, Muon's Newton-Schulz steps.

Every variant runs the same batches of prepared rows (features kept in memory, as `feature_cache_gb`
keeps them), interleaved round by round so machine noise falls on all alike; medians of wall ms per
optimizer step (forward, backward, clipping, optimizer), and each variant's loss on the first batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reused_step.py --data runs/data/s300 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

VARIANTS = {  # name → (labels from kept statistics, bf16 autocast, Muon Newton-Schulz steps)
    "full head, fp32, ns 5 (before)": (False, False, 5),
    "draft-vocab head, fp32, ns 5": (True, False, 5),
    "draft-vocab head, bf16, ns 5": (True, True, 5),
    "draft-vocab head, bf16, ns 3": (True, True, 3),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a `baldeagle prepare` folder for smollm2")
    p.add_argument("--batches", type=int, default=4, help="distinct batches of 4 rows")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over every variant and batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="also write the results to this JSON file")
    return p.parse_args()


def make_optimizer(objective, ns_steps: int):
    import torch

    from baldeagle.train.optim import ChainedOptimizer, goes_to_muon, make_muon

    named = [(n, p) for n, p in objective.draft.named_parameters() if p.requires_grad]
    muon = make_muon([p for n, p in named if goes_to_muon(n, p)], lr=1e-3, weight_decay=0.1, momentum=0.95,
                     ns_steps=ns_steps)
    return ChainedOptimizer([muon, torch.optim.AdamW([p for n, p in named if not goes_to_muon(n, p)], lr=1e-3)])


def main() -> None:
    args = parse_args()
    import torch

    from baldeagle.config import TrainConfig, load_config
    from baldeagle.conventions import torch_dtype
    from baldeagle.data.features import TargetFeatures, TargetLogits
    from baldeagle.quickstart import QUICKSTART_TRAIN, training_target_dtype
    from baldeagle.train import run
    from baldeagle.train.collate import PadCollator
    from baldeagle.train.objective import DraftObjective

    torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, QUICKSTART_TRAIN, ("benchmark", {
        "data": args.data, "out": "/tmp/reused-step", "target_dtype": training_target_dtype()}))
    rows, _ = run.load_prepared(cfg.data)
    target = run.load_target(cfg.model, torch_dtype(cfg.target_dtype), False)
    rows, _ = run.trainable_rows(rows, cfg, None)
    collate = PadCollator(pad_token_id=0, max_length=cfg.max_length)
    batches = [collate([rows[4 * i + j] for j in range(4)]) for i in range(args.batches)]
    torch.manual_seed(0)
    draft0 = run.build_draft(cfg, target, rows, None)
    features = run.make_features(cfg, target, draft0, None)  # CachedFeatures (feature_cache_gb)
    kept = []
    for batch in batches:
        features(batch)  # the first pass keeps the rows
        reused = features(batch)
        assert reused.logits.argmax is not None
        full = TargetLogits(reused.last_hidden, reused.logits.weight, reused.logits.bias)  # no statistics
        kept.append({True: reused, False: TargetFeatures(reused.features, reused.last_hidden, full)})

    setups = {}
    for name, (stats, bf16, ns) in VARIANTS.items():
        draft = run.build_draft(cfg, target, rows, None)
        draft.load_state_dict(draft0.state_dict())
        objective = DraftObjective(draft, cfg.ttt_steps, cfg.feature_noise, cfg.ttt_step_weight, cfg.loss)
        setups[name] = (objective, make_optimizer(objective, ns), stats, bf16)

    def step(name, b) -> tuple[float, float]:
        """One optimizer step of variant `name` on batch b → (wall ms, loss)."""
        objective, optimizer, stats, bf16 = setups[name]
        start = time.perf_counter()
        optimizer.zero_grad()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss, _ = objective(batches[b], kept[b][stats])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.max_grad_norm)
        optimizer.step()
        return (time.perf_counter() - start) * 1e3, loss.item()

    first_loss = {name: step(name, 0)[1] for name in VARIANTS}  # also the warm-up
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for b in range(len(batches)):
            for name in VARIANTS:
                times[name].append(step(name, b)[0])
    base = statistics.median(times[next(iter(VARIANTS))])
    results = []
    print(f"{args.threads} thread(s), {len(batches)} batches x {args.rounds} rounds, "
          f"{int(sum(b['attention_mask'].sum() for b in batches))} tokens in all batches")
    print("| variant | median ms / step | vs before | loss on the first batch |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        median = statistics.median(times[name])
        results.append({"variant": name, "median_ms": median, "speedup": base / median,
                        "first_loss": first_loss[name]})
        print(f"| {name} | {median:.0f} | {base / median:.2f}x | {first_loss[name]:.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
