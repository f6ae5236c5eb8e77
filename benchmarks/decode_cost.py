"""Decoding cost on this machine: what a verification and a draft step cost, and what τ pays.

For a target and a draft (any BaldEagle draft folder), the median wall time, over --repeats
interleaved rounds after a warm-up, of each part of a chain step of `speculative_generate`, on a
cache of --context tokens (the first MT-bench question, tiled):
- plain: one target forward of 1 token (a plain decoding step);
- verify(n): the target forward over the root and n-1 drafted tokens, with the tree mask, the
  positions and the feature layers exactly as speculative decoding runs it;
- verify(n), no mask: the same without the (causal) mask, to see what the mask costs;
- draft(k): drafting a chain of k tokens (`draft_tree`, shape (k, 1, k+1));
- draft fan(w), verify fan(n): the same for a depth-1 fan of the draft's w best first guesses;
- draft tree(k), verify tree(n): the same for the depth-2 trees the score measured (topk k, n tokens);
- commit: the draft reading 2 new rows (one accepted token and the bonus).
The models are measured as `baldeagle eval` runs them (float32 linear weights pre-packed, one-row
forwards through whichever path is faster here, a GQA target's masked verifications through
`baldeagle.model.gqa_attention`; --no-pack and --no-gqa-attention to compare). The measuring and the
prediction are `baldeagle.decode.cost`, which `baldeagle eval --choose-shape-from score.json` uses
to pick its chain's k or fan's width.
With a `baldeagle score` result (--score score.json: per-position acceptance and fan τ), it predicts
the speedup of each chain k and fan w: τ · plain / (draft + verify + commit), and the τ a draft needs
for 1.0x and 1.5x with that shape. Prints a markdown table; writes --out (JSON).

    .venv/bin/python benchmarks/decode_cost.py --draft runs/quickstart/draft --score runs/quickstart/score/score.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from baldeagle.data.prompts import load_prompt_set
from baldeagle.decode.cost import format_costs, measure_costs, predict_shapes
from baldeagle.model.checkpoint import load_draft
from baldeagle.model.gqa_attention import use_gqa_attention
from baldeagle.model.packed import choose_single_row_path, pack_linears
from baldeagle.targets import load_target, load_tokenizer


def context_ids(model: str, context: int) -> torch.Tensor:
    tokenizer = load_tokenizer(model)
    question = load_prompt_set("mtbench", limit=1)[0].turns[0]
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"])
    return torch.tensor([(ids * (context // len(ids) + 1))[-context:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--draft", required=True, help="BaldEagle draft folder")
    parser.add_argument("--score", default="", help="score.json of this draft (per-position acceptance)")
    parser.add_argument("--context", type=int, default=300, help="tokens already in the cache")
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--max-fan", type=int, default=4, help="widest depth-1 fan timed")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-pack", action="store_true",
                        help="keep nn.Linear (eval pre-packs float32 CPU weights; this shows what that buys)")
    parser.add_argument("--no-gqa-attention", action="store_true",
                        help="keep Transformers' sdpa attention (it copies a GQA target's keys and values in "
                             "every masked verification; eval avoids that)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="runs/decode_cost.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target, draft = load_target(args.model), load_draft(args.draft).eval()
    if not args.no_pack:  # as `baldeagle eval` decodes
        pack_linears(target)
        pack_linears(draft)
        single_row = {"target": choose_single_row_path(target), "draft": choose_single_row_path(draft)}
        print(f"one-row forwards packed: target {single_row['target']['single_row_packed']}, "
              f"draft {single_row['draft']['single_row_packed']}")
    if not args.no_gqa_attention:
        use_gqa_attention(target)
    score = json.loads(Path(args.score).read_text()) if args.score else {}
    acceptance, fans = score.get("per_position_acceptance", []), score.get("fan_acceptance_length", [])
    trees = score.get("tree_acceptance_length", [])
    costs = measure_costs(target, draft, context_ids(args.model, args.context), args.max_k, args.max_fan,
                          args.repeats, args.warmup, unmasked=True,
                          trees=[(t["topk"], t["total_tokens"]) for t in trees])
    rows = predict_shapes(costs, acceptance, min(args.max_k, len(acceptance) or args.max_k), fans,
                          min(args.max_fan, len(fans) or args.max_fan), trees)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "packed": not args.no_pack, "threads": torch.get_num_threads(),
                                          "seconds": costs, "shapes": rows}, indent=2) + "\n")
    print(format_costs(costs, rows))


if __name__ == "__main__":
    main()
