"""What Transformers' copy of a GQA target's keys and values costs in tree verification.

Transformers' `sdpa` attention repeats a grouped-query target's keys and values to every query head
whenever a forward queries several tokens under a mask (a verification); `baldeagle eval` swaps in
`baldeagle.model.gqa_attention`, which lets torch's SDPA read them in place. This times the target
forwards of a decoding step both ways, interleaved round by round (the same cache, mask, positions
and feature layers as `speculative_generate`, the linears pre-packed as eval runs them), on caches of
several lengths (the first MT-bench question, tiled):
- plain: one token, no mask (both ways take the same path; the control);
- verify(n): the root and n-1 drafted nodes under a tree mask (n = 4: a chain of 3; 6: a depth-2
  tree, topk 4; 9: topk 5).
Prints a markdown table of medians and the ratio; writes --out (JSON).

    .venv/bin/python benchmarks/gqa_attention.py --contexts 100,300,600
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from baldeagle.decode.speculative import new_target_cache, target_forward
from baldeagle.decode.tree import tree_from_parents
from baldeagle.model.gqa_attention import NAME, use_gqa_attention
from baldeagle.model.packed import choose_single_row_path, pack_linears
from baldeagle.targets import load_target

from decode_cost import context_ids  # benchmarks/ is this script's own folder


def tree_of(size: int) -> torch.Tensor:
    """Parents of an n-row tree ([root + n - 1 nodes]): the first min(n-1, 4) nodes below the root,
    the rest below the first nodes (a depth-2 EAGLE-2 tree's usual shape)."""
    first = min(size - 1, 4)
    return torch.tensor([-1] * first + [i % first for i in range(size - 1 - first)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--contexts", default="100,300,600", help="cache lengths, comma-separated")
    parser.add_argument("--sizes", default="4,6,9", help="verified rows (root included), comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="runs/gqa_attention.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.model)
    pack_linears(target)
    choose_single_row_path(target)
    if not use_gqa_attention(target):
        raise SystemExit(f"{args.model} does not run sdpa attention: nothing to compare")
    aux = [1, 2, 3]
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for context in [int(c) for c in args.contexts.split(",")]:
        ids = context_ids(args.model, context)
        n = ids.shape[1]
        cache = new_target_cache(target)
        with torch.inference_mode():
            target_forward(target, ids, torch.arange(n)[None], cache)

        def run(tokens, positions, mask):
            target_forward(target, tokens, positions, cache, mask, aux_layer_ids=aux)
            for layer in cache.layers:  # back to the prefix
                layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]

        parts = {"plain": lambda: run(ids[:, -1:], torch.tensor([[n]]), None)}
        for size in sizes:
            tree = tree_from_parents(ids[0, 1:size], tree_of(size))
            parts[f"verify({size})"] = lambda t=tree: run(torch.cat([ids[:, -1:], t.tokens[None]], 1),
                                                          t.position_ids(n), t.attention_mask(n))
        times = {(name, way): [] for name in parts for way in ("sdpa", "gqa")}
        with torch.inference_mode():
            for round_ in range(args.warmup + args.repeats):
                ways = ("sdpa", "gqa") if round_ % 2 == 0 else ("gqa", "sdpa")
                for way in ways:
                    target.set_attn_implementation("sdpa" if way == "sdpa" else NAME)
                    for name, part in parts.items():
                        start = time.perf_counter()
                        part()
                        if round_ >= args.warmup:
                            times[(name, way)].append(time.perf_counter() - start)
        for name in parts:
            sdpa, gqa = (statistics.median(times[(name, way)]) for way in ("sdpa", "gqa"))
            results.append({"context": n, "forward": name, "sdpa_ms": 1000 * sdpa, "gqa_ms": 1000 * gqa,
                            "ratio": gqa / sdpa})
    print("| cache tokens | forward | Transformers sdpa (ms) | in-place GQA (ms) | ratio |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['context']} | {r['forward']} | {r['sdpa_ms']:.1f} | {r['gqa_ms']:.1f} | {r['ratio']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
