"""Where one EAGLE-3 training step's time goes: target forward, target LM head, draft forward,
draft backward, optimiser, for the packaged SmolLM2 on packed prepared rows.

Reports medians of CPU seconds (process time: steadier than wall time on a shared machine) and
wall seconds, for the TTT unroll on the rows a trained loss needs (default) and, with
--all-rows, on every row at every step (the plain unroll, for comparison).

    .venv/bin/python benchmarks/train_step_profile.py --prepared runs/bench/prepared --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", required=True, help="a `baldeagle prepare` folder for smollm2")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=8, help="profiled steps (the first is dropped)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--all-rows", action="store_true", help="run every row at every TTT step")
    return p.parse_args()


def main() -> None:
    import torch

    from baldeagle.data.features import OnlineFeatures
    from baldeagle.data.prepare import load_prepared
    from baldeagle.model.draft_config import draft_config_from_target
    from baldeagle.model.eagle3 import Eagle3Draft
    from baldeagle.model.vocab import build_draft_vocab
    from baldeagle.targets import load_target
    from baldeagle.train.ttt import StepRows, scored_positions, shift_left, ttt_forward, ttt_loss, ttt_unroll

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dataset, _ = load_prepared(args.prepared)
    ids, mask = [], []
    for row in dataset:  # packed into rows of exactly seq_len tokens, as the throughput benchmark does
        ids += row["input_ids"]
        mask += row["loss_mask"]
        if len(ids) >= args.seq_len * args.steps:
            break
    ids = torch.tensor(ids[: args.seq_len * args.steps]).view(args.steps, 1, args.seq_len)
    mask = torch.tensor(mask[: args.seq_len * args.steps]).view(args.steps, 1, args.seq_len)

    target = load_target("smollm2", dtype=getattr(torch, args.target_dtype))
    cfg = draft_config_from_target(target.config, "eagle3", draft_vocab_size=args.draft_vocab)
    counts = torch.bincount(ids[mask.bool()], minlength=cfg.vocab_size)
    d2t, _, _ = build_draft_vocab(counts, args.draft_vocab)
    draft = Eagle3Draft.from_target(target, cfg, d2t=d2t).float()
    features = OnlineFeatures(target, "eagle3", cfg.aux_layer_ids)
    optimizer = torch.optim.AdamW(list(draft.trainable_parameters().values()), lr=1e-3, fused=True)

    class Logits:  # the target's logits at the trained positions, computed (and timed) beforehand
        def __init__(self, values):
            self.values = values

        def __getitem__(self, index):
            return self.values

    parts = ("target forward", "target LM head", "draft forward", "draft backward", "optimiser", "total")
    cpu, wall = {p: [] for p in parts}, {p: [] for p in parts}
    for x, m in zip(ids, mask):
        real = torch.ones_like(x)
        marks = [(time.process_time(), time.perf_counter())]
        with torch.no_grad():
            target_out = features({"input_ids": x, "attention_mask": real})
        marks.append((time.process_time(), time.perf_counter()))
        b_idx, p_idx = shift_left(m, 1).bool().nonzero(as_tuple=True)
        logits = Logits(target_out.logits[b_idx, p_idx])
        marks.append((time.process_time(), time.perf_counter()))
        if args.all_rows:  # the plain unroll: every row at every step
            every, trained = real.bool(), scored_positions(m, real)
            runs = [StepRows.where(every)] * args.ttt_steps
            positions = torch.arange(x.shape[1]).expand_as(x)
            outputs = ttt_unroll(draft, x, target_out.features, runs, every, positions)
            out = ttt_loss(draft, outputs, runs, trained, every, logits)
        else:
            out = ttt_forward(draft, x, target_out.features, logits, m, steps=args.ttt_steps, attention_mask=real)
        marks.append((time.process_time(), time.perf_counter()))
        out.loss.backward()
        marks.append((time.process_time(), time.perf_counter()))
        optimizer.step()
        optimizer.zero_grad()
        marks.append((time.process_time(), time.perf_counter()))
        for i, part in enumerate(parts[:-1]):
            cpu[part].append(marks[i + 1][0] - marks[i][0])
            wall[part].append(marks[i + 1][1] - marks[i][1])
        cpu["total"].append(marks[-1][0] - marks[0][0])
        wall["total"].append(marks[-1][1] - marks[0][1])

    trained = float(mask.float().mean())
    print(f"target {args.target_dtype}, draft float32, {args.threads} thread(s), TTT {args.ttt_steps} steps on "
          f"{'every row' if args.all_rows else 'the rows a trained loss needs'}; seq_len {args.seq_len}, "
          f"{trained:.0%} of tokens trained; medians of {args.steps - 1} steps")
    print("| part | CPU s | wall s |\n|---|---|---|")
    for part in parts:
        print(f"| {part} | {statistics.median(cpu[part][1:]):.3f} | {statistics.median(wall[part][1:]):.3f} |")


if __name__ == "__main__":
    main()
