"""Speculative decoding speed on this machine: SmolLM2 + a trained draft on MT-bench, greedy.

Runs `baldeagle eval` (`run_eval`) once per decoding mode (chain, EAGLE-2 tree); each run decodes
every prompt plainly, speculatively and with Transformers prompt lookup, side by side, and checks
the speculative answers equal the plain ones token for token. Prints a markdown table.

    python benchmarks/eval_speedup.py --draft runs/quickstart/draft/final
    python benchmarks/eval_speedup.py --draft DIR --limit 20 --max-new-tokens 256 --modes chain
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from baldeagle.config import EvalConfig
from baldeagle.decode.bench import run_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, help="draft checkpoint folder")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", default="mtbench")
    parser.add_argument("--out", default="runs/bench_eval")
    parser.add_argument("--modes", default="chain,tree", help="comma-separated: chain, tree")
    parser.add_argument("--limit", type=int, default=0, help="prompts (0 = all 80)")
    parser.add_argument("--both-turns", action="store_true", help="also the second MT-bench turn")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--tree-depth", type=int, default=5)
    parser.add_argument("--tree-topk", type=int, default=4)
    parser.add_argument("--tree-total-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (target and draft)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-prompt-lookup", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for mode in args.modes.split(","):
        cfg = EvalConfig(
            model=args.model, draft=args.draft, out=str(Path(args.out) / mode), prompts=args.prompts, mode=mode,
            limit=args.limit, first_turn_only=not args.both_turns, max_new_tokens=args.max_new_tokens,
            num_draft_tokens=args.num_draft_tokens, tree_depth=args.tree_depth, tree_topk=args.tree_topk,
            tree_total_tokens=args.tree_total_tokens, temperature=0.0, prompt_lookup=not args.no_prompt_lookup,
            target_dtype=args.dtype,
        )
        result = run_eval(cfg)
        rows.append((mode, result))

    def num(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)

    print()
    print("| mode | shape | τ | tokens/s | plain tokens/s | prompt lookup tokens/s | speedup vs plain "
          "| speedup vs prompt lookup | exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows:
        s = r["settings"]
        shape = f"k={s['num_draft_tokens']}" if mode == "chain" else (
            f"depth {s['tree_depth']}, top-{s['tree_topk']}, {s['tree_total_tokens']} tokens")
        print(f"| {mode} | {shape} | {r['acceptance_length']:.2f} | {r['tokens_per_second']:.1f} "
              f"| {r['baseline_tokens_per_second']:.1f} | {num(r['prompt_lookup_tokens_per_second'], '{:.1f}')} "
              f"| {num(r['speedup'], '{:.2f}x')} | {num(r['speedup_vs_prompt_lookup'], '{:.2f}x')} "
              f"| {r['outputs_match_baseline']} |")
    first = rows[0][1]
    print(f"\n{first['num_prompts']} prompts, {first['num_turns']} turns, max_new_tokens {args.max_new_tokens}, "
          f"greedy, {args.dtype}, {first['settings']['torch_threads']} threads; results in {args.out}/<mode>/eval.json")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = {mode: {k: r[k] for k in ("acceptance_length", "tokens_per_second", "baseline_tokens_per_second",
                                        "prompt_lookup_tokens_per_second", "speedup", "speedup_vs_prompt_lookup",
                                        "outputs_match_baseline")} for mode, r in rows}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
