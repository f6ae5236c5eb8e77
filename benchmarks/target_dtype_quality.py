"""Does a bfloat16 target change what an EAGLE-3 draft learns? Trains three drafts for the packaged
SmolLM2 with `baldeagle train` for --steps steps: float32 target, bfloat16 target (both seed 0),
and float32 with seed 7 (another initialisation and data order: the noise reference, trained on
the rows outside seed 0's held-out split so that nothing it saw is scored). Then scores every
final draft on seed 0's held-out rows against the float32 target: per-step accuracy, loss, τ_sim.

    .venv/bin/python benchmarks/target_dtype_quality.py --prepared runs/bench/prepared --out runs/dtype_quality

A finished draft in --out is reused, so a second call only scores.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", required=True, help="a `baldeagle prepare` folder for smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def main() -> None:
    import torch

    from baldeagle.config import TrainConfig
    from baldeagle.data.features import OnlineFeatures
    from baldeagle.data.prepare import load_prepared
    from baldeagle.model.checkpoint import load_draft
    from baldeagle.targets import load_target
    from baldeagle.train import run as train_run
    from baldeagle.train.collate import PadCollator
    from baldeagle.train.losses import tau_sim
    from baldeagle.train.ttt import ttt_forward

    args = parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    settings = dict(model="smollm2", ttt_steps=3, draft_vocab_size=8192, max_length=512, learning_rate=1e-3,
                    lr_scheduler_type="cosine", warmup_steps=0.05, max_steps=args.steps,
                    per_device_train_batch_size=4, logging_steps=10, save_steps=100000, eval_fraction=0.05,
                    report_to="none", overwrite=True)
    cfg = TrainConfig(out=str(root / "unused"), data=args.prepared, **settings)
    dataset, _ = load_prepared(args.prepared)
    train_rows, held_out = train_run.split_rows(dataset, cfg)
    train_only = root / "train_only"
    if not train_only.exists():
        dataset.select(sorted(train_rows["row_index"])).save_to_disk(str(train_only))
        for name in ("stats.json", "config.yaml"):
            shutil.copy(Path(args.prepared) / name, train_only / name)

    variants = {  # name: (target dtype, seed, data)
        "float32": ("float32", 0, args.prepared),
        "bfloat16": ("bfloat16", 0, args.prepared),
        "float32_seed7": ("float32", 7, str(train_only)),
    }
    for name, (dtype, seed, data) in variants.items():
        if not (root / name / "final").exists():
            train_run.run_train(TrainConfig(out=str(root / name), target_dtype=dtype, seed=seed, data=data,
                                            **settings, disable_tqdm=True))

    target = load_target("smollm2", torch.float32)
    collate = PadCollator(pad_token_id=int(target.config.pad_token_id or 0), max_length=512)
    results = {}
    for name in variants:
        draft = load_draft(str(root / name / "final")).eval()
        features = OnlineFeatures(target, "eagle3", draft.config.aux_layer_ids)
        correct, count, loss = [0.0] * 3, [0.0] * 3, [0.0] * 3
        with torch.no_grad():
            for start in range(0, len(held_out), 8):
                batch = collate([held_out[i] for i in range(start, min(start + 8, len(held_out)))])
                target_out = features(batch)
                out = ttt_forward(draft, batch["input_ids"], target_out.features, target_out.logits,
                                  batch["loss_mask"], steps=3, attention_mask=batch["attention_mask"])
                for k in range(3):
                    correct[k] += float(out.correct[k])
                    count[k] += float(out.count[k])
                    loss[k] += float(out.step_losses[k]) * float(out.count[k])
        accs = [c / n for c, n in zip(correct, count)]
        results[name] = {"acc": [round(a, 4) for a in accs], "loss": [round(x / n, 4) for x, n in zip(loss, count)],
                         "tau_sim": round(tau_sim(accs), 4), "held_out_rows": len(held_out)}
        print(name, results[name], flush=True)
    (root / "quality.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
