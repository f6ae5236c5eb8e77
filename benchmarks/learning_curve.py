"""Learning curve: the yardstick (MT-bench chain τ, teacher-forced) against training minutes and
target tokens read, for BaldEagle and (with --peer) speculators 0.9.0 on the same data and budgets.

Ours: one `baldeagle train` run with the quickstart's settings for the largest budget, scored by
the yardstick every --eval-every steps (`eval_prompts`); each budget reads the last evaluation at
or before it on the training clock (`train_minutes`, evaluations excluded). The peer has no
yardstick inside its loop: it trains once to the largest budget (benchmarks/peer_speculators_draft.py
in .venv-speculators, same rows, draft vocabulary, TTT steps, lr, batch and length) and saves its
draft at every smaller one (`--save-at`, off its clock); each save is converted with `load_exported`
and scored by `baldeagle score` on the same cached answers.

    .venv/bin/python benchmarks/learning_curve.py --data runs/quickstart/prepared --marks 6,12,24,48
    # side by side, one thread each (two processes at once), the peer with our draft's vocabulary:
    .venv/bin/python benchmarks/learning_curve.py --data D --marks 6,12 --threads 1 --side ours &
    .venv/bin/python benchmarks/learning_curve.py --data D --marks 6,12 --threads 1 --side peer \
        --peer-d2t runs/other_draft_on_D/model.safetensors
Writes OUT/curve-SIDE.json and OUT/curve-SIDE.md; OUT/curve.png once both sides are there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from baldeagle.config import ScoreConfig, TrainConfig, load_config
from baldeagle.decode.score import run_score
from baldeagle.quickstart import QUICKSTART_TRAIN, training_target_dtype
from baldeagle.train.run import run_train

REPO = Path(__file__).resolve().parents[1]


def train_ours(args, out: Path) -> list[dict]:
    """One run to the largest mark; → its evaluations [{minutes, step, tokens, tau, categories}]."""
    cfg = load_config(TrainConfig, QUICKSTART_TRAIN, ("curve", {
        "model": args.model, "data": args.data, "out": str(out), "overwrite": True,
        "max_minutes": max(args.marks), "num_train_epochs": 1000, "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 20, "target_dtype": args.target_dtype or training_target_dtype(), "eval_fraction": 0.0,
        "bf16": (args.target_dtype or training_target_dtype()) == "bfloat16",  # as the quickstart
        "eval_steps": args.eval_every, "save_steps": 100000, "eval_prompts": args.prompts,
        "eval_prompts_limit": args.limit, "eval_prompts_new_tokens": args.new_tokens, "eval_chain_k": args.k}))
    if not (out / "final" / "metrics.json").is_file():
        run_train(cfg)
    history = json.loads((out / "final" / "metrics.json").read_text())["log_history"]
    points, clock = [], {"train_minutes": 0.0, "target_tokens": 0}
    for row in history:
        clock.update({k: row[k] for k in ("train_minutes", "target_tokens") if k in row})
        if "eval_prompts_tau" in row:
            points.append({"minutes": clock["train_minutes"], "step": row.get("step", 0),
                           "tokens": clock["target_tokens"], "tau": row["eval_prompts_tau"],
                           "categories": {k.removeprefix("eval_prompts_tau_"): v for k, v in row.items()
                                          if k.startswith("eval_prompts_tau_") and k != "eval_prompts_tau_every_position"}})
    return points


def at_marks(points: list[dict], marks: list[float]) -> list[dict]:
    """The last evaluation at or before each mark (the final one for the largest)."""
    rows = []
    for mark in marks:
        seen = [p for p in points if p["minutes"] <= mark + 1e-9] or points[:1]
        rows.append({"mark": mark, **(points[-1] if mark == max(marks) else seen[-1])})
    return rows


def train_peer(args, d2t: Path, out: Path) -> list[dict]:
    """The peer trained once to the largest mark, saved at every mark (its lr is constant, so a
    save at M minutes is an M-minute run), each converted to a BaldEagle draft folder and scored;
    → [{mark, minutes, step, tokens, tau, categories}]."""
    from baldeagle.export_load import load_exported
    from baldeagle.model.checkpoint import save_draft
    from baldeagle.targets import resolve_model

    folder, last = out / "peer", max(args.marks)
    if not (folder / "speculators" / "config.json").is_file():
        command = [args.peer_python, str(REPO / "benchmarks" / "peer_speculators_draft.py"), "--data", args.data,
                   "--out", str(folder), "--target", resolve_model(args.model), "--d2t",
                   str(d2t), "--minutes", str(last), "--epochs", "1000", "--threads", str(args.threads or 0),
                   "--save-at", ",".join(f"{m:g}" for m in args.marks if m != last),
                   "--ttt-steps", str(args.peer_ttt_steps or quickstart_ttt_steps()), "--draft-vocab", "8192", "--lr", "1e-3", "--batch-size", "4",
                   "--max-length", "512", "--target-dtype", args.target_dtype or training_target_dtype(),
                   "--val-rows", "0", "--scheduler", "none"]  # constant lr, as ours after its 20 warm-up steps
        folder.mkdir(parents=True, exist_ok=True)
        with open(out / "peer.log", "w") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode:
                sys.exit(f"peer training failed: see {out / 'peer.log'}")
    rows = []
    for mark in args.marks:
        at = folder if mark == last else folder / f"at-{mark:g}min"
        info = json.loads((at / "train.json").read_text())
        draft = save_draft(load_exported(at / "speculators", target=resolve_model(args.model)), at / "baldeagle")
        rows.append({"mark": mark, "minutes": info["train_seconds"] / 60, "step": info["steps"],
                     "tokens": info["target_tokens"], **score(args, draft, at / "score")})
    return rows


def quickstart_ttt_steps() -> int:
    """The peer trains with our TTT steps unless told otherwise (the same recipe, another trainer)."""
    return load_config(TrainConfig, QUICKSTART_TRAIN).ttt_steps


def score(args, draft: Path, out: Path) -> dict:
    result = run_score(ScoreConfig(model=args.model, draft=str(draft), out=str(out), prompts=args.prompts,
                                   limit=args.limit, max_new_tokens=args.new_tokens, num_draft_tokens=args.k))
    return {"tau": result["acceptance_length"],
            "categories": {k: v["acceptance_length"] for k, v in result["per_category"].items()}}


def plot(ours: list[dict], peer: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "minutes", "training minutes (this machine)"),
                           (axes[1], "tokens", "target tokens read")):
        ax.plot([p[key] for p in ours], [p["tau"] for p in ours], "o-", label="BaldEagle (every evaluation)")
        if peer:
            ax.plot([p[key] for p in peer], [p["tau"] for p in peer], "s--", label="speculators 0.9.0")
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="MT-bench chain τ (yardstick)")
    axes[0].legend()
    fig.suptitle("learning curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="`baldeagle prepare` folder")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--marks", default="6,12,24,48", help="training budgets in minutes")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between yardstick evaluations")
    parser.add_argument("--prompts", default="mtbench")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--target-dtype", default="", help="the frozen target's dtype in training (default: the quickstart's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0 = torch's default)")
    parser.add_argument("--side", choices=["ours", "peer", "both"], default="both")
    parser.add_argument("--peer-d2t", default="", help="safetensors with the d2t the peer uses (default: our final draft's)")
    parser.add_argument("--peer-ttt-steps", type=int, default=0, help="the peer's TTT steps (default: the quickstart's)")
    parser.add_argument("--peer-python", default=str(REPO / ".venv-speculators" / "bin" / "python"))
    parser.add_argument("--out", default="runs/learning_curve")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.marks = sorted(float(m) for m in args.marks.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.side in ("ours", "both"):
        points = train_ours(args, out / "ours")
        rows = at_marks(points, args.marks)
        (out / "curve-ours.json").write_text(json.dumps({"points": points, "at_marks": rows}, indent=2) + "\n")
        report(rows, "BaldEagle", out / "curve-ours.md")
    if args.side in ("peer", "both"):
        d2t = Path(args.peer_d2t) if args.peer_d2t else out / "ours" / "final" / "model.safetensors"
        rows = train_peer(args, d2t, out)
        (out / "curve-peer.json").write_text(json.dumps({"at_marks": rows}, indent=2) + "\n")
        report(rows, "speculators 0.9.0", out / "curve-peer.md")
    if (out / "curve-ours.json").is_file():
        peer = json.loads((out / "curve-peer.json").read_text())["at_marks"] if (out / "curve-peer.json").is_file() else []
        plot(json.loads((out / "curve-ours.json").read_text())["points"], peer, out / "curve.png")


def report(rows: list[dict], who: str, path: Path) -> None:
    lines = [f"| minutes ({who}) | steps | target tokens | MT-bench τ | τ by category |", "|---|---|---|---|---|"]
    for row in rows:
        cats = ", ".join(f"{k} {v:.2f}" for k, v in row["categories"].items())
        lines.append(f"| {row['mark']:g} ({row['minutes']:.1f}) | {row.get('step', '-')} | {row.get('tokens', '-')} | "
                     f"{row['tau']:.3f} | {cats} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
