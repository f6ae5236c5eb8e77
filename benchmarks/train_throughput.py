"""Training throughput: BaldEagle's EAGLE-3 trainer vs the `speculators` 0.9.0 draft, side by side.

Both train an EAGLE-3 draft for the packaged SmolLM2 with the target online (its forward is
timed too), on the same packed chitchat sequences of --seq-len tokens, one sequence per step,
the same TTT steps, draft vocabulary and learning rate, and the target in the same precision
(--target-dtype; both drafts train in float32). Each side runs in its own process (and its own
virtual environment for the peer), alternating, --rounds times; we quote medians.

    .venv/bin/python benchmarks/train_throughput.py --prepared runs/quickstart/prepared \
        --seq-len 512 --ttt-steps 3 --draft-vocab 8192 --steps 10 --warmup-steps 3 --rounds 3

Set up the peer first: bash benchmarks/setup_speculators_venv.sh
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-speculators" / "bin" / "python"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared", required=True, help="a `baldeagle prepare` folder for smollm2")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="precision of the frozen target, on both sides")
    p.add_argument("--worker", choices=["ours"], help=argparse.SUPPRESS)
    p.add_argument("--packed", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help="write the summary JSON here")
    return p.parse_args()


def pack(prepared: str, seq_len: int, rows_needed: int, folder: Path) -> Path:
    """Concatenate prepared rows and cut them into rows of exactly seq_len tokens."""
    from datasets import Dataset

    from baldeagle.data.prepare import load_prepared

    dataset, _ = load_prepared(prepared)
    ids, mask = [], []
    for row in dataset:
        ids.extend(row["input_ids"])
        mask.extend(row["loss_mask"])
        if len(ids) >= seq_len * rows_needed:
            break
    if len(ids) < seq_len * rows_needed:
        raise SystemExit(f"{prepared} holds {len(ids)} tokens; {seq_len * rows_needed} needed")
    cut = range(0, seq_len * rows_needed, seq_len)
    Dataset.from_dict({"input_ids": [ids[i:i + seq_len] for i in cut],
                       "loss_mask": [mask[i:i + seq_len] for i in cut]}).save_to_disk(str(folder))
    trained = sum(mask[: seq_len * rows_needed])
    (folder / "stats.json").write_text(json.dumps({"rows_kept": rows_needed, "trained_tokens": trained}))
    return folder


def run_ours(args) -> dict:
    """One training run of BaldEagle's trainer; per-step wall and CPU times from a Trainer callback."""
    import torch
    from datasets import load_from_disk
    from transformers import TrainerCallback

    from baldeagle.config import TrainConfig
    from baldeagle.train import run as train_run

    torch.set_num_threads(args.threads)
    rows = load_from_disk(args.packed)
    times: list[float] = []
    cpu: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)
            cpu.append(time.process_time() - self.cpu)

    original = train_run.EagleTrainer.__init__

    def with_timer(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(StepTimer())

    train_run.EagleTrainer.__init__ = with_timer
    total = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory() as out:
        train_run.run_train(TrainConfig(
            data=args.packed, out=out, ttt_steps=args.ttt_steps, draft_vocab_size=args.draft_vocab,
            max_length=args.seq_len, target_dtype=args.target_dtype, learning_rate=args.lr, warmup_steps=0, max_steps=total,
            per_device_train_batch_size=1, logging_steps=1000, save_steps=100000, eval_fraction=0.0,
            train_sampling_strategy="sequential", disable_tqdm=True,
        ))
    # Trained tokens as the peer counts them: loss-masked tokens a position predicts (not x_0).
    trained = [sum(rows[i]["loss_mask"][1:]) for i in range(args.warmup_steps, total)]
    return summarise("baldeagle", times[args.warmup_steps:], cpu[args.warmup_steps:], trained, args.seq_len)


def summarise(name: str, times: list[float], cpu: list[float], trained: list[int], seq_len: int) -> dict:
    """The peer script's statistics: rates over the whole timed window, plus the median step.
    Per CPU second (the process's, all threads) is steadier than per second when other jobs share
    the machine, but counts spin-waiting threads too."""
    return {
        "name": name,
        "median_step_s": statistics.median(times),
        "steps_per_s": len(times) / sum(times),
        "plain_tokens_per_s": seq_len * len(times) / sum(times),
        "trained_tokens_per_s": sum(trained) / sum(times),
        "trained_tokens_per_cpu_s": sum(trained) / sum(cpu),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_side(cmd: list[str]) -> dict:
    """One run of one side; notes the 1-minute load average before and after (other jobs skew times)."""
    before = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([*cmd, "--out", out.name], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        result = json.loads(Path(out.name).read_text())
    result["load_1m_before_after"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return result


def main() -> None:
    args = parse_args()
    if args.worker:
        result = run_ours(args)
        Path(args.out).write_text(json.dumps(result))
        return
    if not PEER_PYTHON.exists():
        raise SystemExit("peer venv missing: bash benchmarks/setup_speculators_venv.sh")
    common = ["--seq-len", str(args.seq_len), "--ttt-steps", str(args.ttt_steps), "--draft-vocab",
              str(args.draft_vocab), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
              "--threads", str(args.threads), "--lr", str(args.lr), "--target-dtype", args.target_dtype]
    with tempfile.TemporaryDirectory() as tmp:
        packed = pack(args.prepared, args.seq_len, args.warmup_steps + args.steps, Path(tmp) / "packed")
        ours_cmd = [sys.executable, __file__, "--worker", "ours", "--packed", str(packed), "--prepared",
                    args.prepared, *common]
        peer_cmd = [str(PEER_PYTHON), "benchmarks/peer_speculators_train.py", "--data", str(packed), *common]
        results = {"baldeagle": [], "speculators": []}
        for round_ in range(args.rounds):
            results["baldeagle"].append(run_side(ours_cmd))
            results["speculators"].append(run_side(peer_cmd))
            ours, peer = results["baldeagle"][-1], results["speculators"][-1]
            print(f"round {round_ + 1}: ours {ours['trained_tokens_per_s']:.0f} trained tok/s "
                  f"(load {ours['load_1m_before_after']}), speculators {peer['trained_tokens_per_s']:.0f} "
                  f"(load {peer['load_1m_before_after']})", flush=True)
    report(args, results)


def report(args, results: dict) -> None:
    def med(side, key):
        return statistics.median(r[key] for r in results[side])

    rows = []
    for side in ("baldeagle", "speculators"):
        rows.append((side, med(side, "trained_tokens_per_s"), med(side, "plain_tokens_per_s"),
                     med(side, "steps_per_s"), med(side, "trained_tokens_per_cpu_s"),
                     max(r["peak_rss_mib"] for r in results[side])))
    ratio = rows[0][1] / rows[1][1]
    cpu_ratio = rows[0][4] / rows[1][4]
    print(f"\nseq_len={args.seq_len} ttt_steps={args.ttt_steps} draft_vocab={args.draft_vocab} "
          f"target_dtype={args.target_dtype} "
          f"rounds={args.rounds} steps/round={args.steps} (medians)")
    print("| trainer | trained tok/s | tok/s | steps/s | trained tok/CPU-s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for name, trained, tokens, steps, per_cpu, rss in rows:
        print(f"| {name} | {trained:.0f} | {tokens:.0f} | {steps:.3f} | {per_cpu:.0f} | {rss:.0f} |")
    print(f"ratio (trained tokens/s): {ratio:.2f}x; per CPU second: {cpu_ratio:.2f}x")
    if args.out:
        summary = {"settings": vars(args), "results": results, "ratio": ratio, "cpu_ratio": cpu_ratio}
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
