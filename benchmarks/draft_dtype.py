"""The draft's dtype while decoding: float32 (the target's) against bfloat16, same shape, same process.

`baldeagle eval --draft-dtype bfloat16` keeps the float32 target (which alone decides what is
accepted) and runs only the draft in bfloat16: its weights are half the bytes, and on a CPU with
native bf16 its one-row forwards read them through oneDNN. This decodes every prompt three ways,
interleaved and repeated in reversed order (`baldeagle.decode.evaluate.time_turn`): plain decoding,
speculative with the float32 draft, speculative with the bfloat16 draft, all with one fixed shape
(default: the fan of 4 the quickstart's cost model picks on this CPU). Prints tokens/s medians,
per-turn speedup ratios, acceptance and exactness; writes --out (JSON).

    .venv/bin/python benchmarks/draft_dtype.py --draft runs/quickstart/draft --limit 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from baldeagle.config import EvalConfig
from baldeagle.decode.evaluate import _load, render, time_turn
from baldeagle.decode.speculative import plain_generate, speculative_generate
from baldeagle.model.checkpoint import load_draft
from baldeagle.model.packed import choose_single_row_path, pack_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--draft", required=True)
    parser.add_argument("--limit", type=int, default=10, help="MT-bench first turns")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--fan", type=int, default=4, help="a depth-1 fan of this many first guesses")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/draft_dtype.json")
    args = parser.parse_args()
    cfg = EvalConfig(model=args.model, draft=args.draft, out=str(Path(args.out).parent), mode="tree",
                     tree_depth=1, tree_topk=args.fan, tree_total_tokens=args.fan + 1, limit=args.limit,
                     first_turn_only=True, max_new_tokens=args.max_new_tokens)
    session = _load(cfg)  # float32 target and draft, packed as eval runs them
    draft_bf16 = load_draft(args.draft, dtype=torch.bfloat16).eval()
    pack_linears(draft_bf16)  # a no-op in bfloat16 (oneDNN already); kept for symmetry with eval
    choose_single_row_path(draft_bf16)
    target = session.target
    decoders = {
        "plain": lambda ids, s, g: plain_generate(target, ids, s, g),
        "float32": lambda ids, s, g: speculative_generate(target, session.draft, ids, s, g),
        "bfloat16": lambda ids, s, g: speculative_generate(target, draft_bf16, ids, s, g),
    }
    warm = dataclasses.replace(session.settings, max_new_tokens=8)
    first_ids = render(session.tokenizer, session.prompts[0], [], 0)
    for decode in decoders.values():
        decode(first_ids, warm, None)
    rows = []
    for prompt in session.prompts:
        ids = render(session.tokenizer, prompt, [], 0)
        first, timings, _ = time_turn(decoders, ids, session.settings, dict.fromkeys(decoders, 0), args.repeats)
        wall = {name: statistics.median(t["wall"]) for name, t in timings.items()}
        rows.append({
            "prompt_id": prompt.id, "new_tokens": len(first["plain"].tokens), "wall": wall,
            "identical": {name: first[name].tokens == first["plain"].tokens for name in ("float32", "bfloat16")},
            "tau": {name: 1 + statistics.fmean(first[name].accepted) for name in ("float32", "bfloat16")},
        })
        print(prompt.id, {k: round(v, 3) for k, v in wall.items()}, rows[-1]["identical"], flush=True)
    result = summarise(rows, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": result, "rows": rows}, indent=2) + "\n")
    print(table(result))


def summarise(rows: list[dict], args) -> dict:
    tokens = sum(r["new_tokens"] for r in rows)
    rate = {name: tokens / sum(r["wall"][name] for r in rows) for name in ("plain", "float32", "bfloat16")}
    per_turn = {name: statistics.median(r["wall"]["plain"] / r["wall"][name] for r in rows)
                for name in ("float32", "bfloat16")}
    bf16_over_f32 = statistics.median(r["wall"]["float32"] / r["wall"]["bfloat16"] for r in rows)
    taus = {name: statistics.fmean(r["tau"][name] for r in rows) for name in ("float32", "bfloat16")}
    return {"fan": args.fan, "prompts": len(rows), "repeats": args.repeats, "tokens_per_second": rate,
            "speedup": {name: rate[name] / rate["plain"] for name in ("float32", "bfloat16")},
            "median_turn_speedup": per_turn, "median_turn_bf16_over_f32": bf16_over_f32, "tau": taus,
            "identical": {name: all(r["identical"][name] for r in rows) for name in ("float32", "bfloat16")}}


def table(s: dict) -> str:
    lines = [f"fan w={s['fan']}, {s['prompts']} MT-bench first turns, {s['repeats']} repeats interleaved",
             "| draft dtype | τ (mean per turn) | tokens/s | speedup vs plain | median per-turn speedup | identical |",
             "|---|---|---|---|---|---|", f"| (plain) | - | {s['tokens_per_second']['plain']:.1f} | 1.00x | - | - |"]
    for name in ("float32", "bfloat16"):
        lines.append(f"| {name} | {s['tau'][name]:.3f} | {s['tokens_per_second'][name]:.1f} | "
                     f"{s['speedup'][name]:.3f}x | {s['median_turn_speedup'][name]:.3f}x | {s['identical'][name]} |")
    lines.append(f"median per-turn bf16 / f32 speed: {s['median_turn_bf16_over_f32']:.3f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
