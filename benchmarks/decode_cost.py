"""Decoding cost on this machine: what a verification and a draft step cost, and what τ pays.

For a target and a draft (any BaldEagle draft folder), the median wall time, over --repeats
interleaved rounds after a warm-up, of each part of a chain step of `speculative_generate`, on a
cache of --context tokens (the first MT-bench question, tiled):
- plain: one target forward of 1 token (a plain decoding step);
- verify(n): the target forward over the root and n-1 drafted tokens, with the tree mask, the
  positions and the feature layers exactly as speculative decoding runs it;
- verify(n), no mask: the same without the (causal) mask, to see what the mask costs;
- draft(k): drafting a chain of k tokens (`draft_tree`, shape (k, 1, k+1));
- commit: the draft reading 2 new rows (one accepted token and the bonus).
With a `baldeagle score` result (--score score.json: per-position acceptance), it predicts the chain
speedup for each k: τ(k) · plain / (draft(k) + verify(k+1) + commit), and the τ a draft needs for
1.0x and 1.5x at that k. Prints a markdown table; writes --out (JSON).

    .venv/bin/python benchmarks/decode_cost.py --draft runs/quickstart/draft --score runs/quickstart/score/score.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from baldeagle.data.prompts import load_prompt_set
from baldeagle.decode.speculative import SpecSettings, draft_tree, new_target_cache, prefill, target_forward
from baldeagle.model.checkpoint import load_draft
from baldeagle.model.layers import DraftCache
from baldeagle.targets import load_target, load_tokenizer


def context_ids(model: str, context: int) -> torch.Tensor:
    tokenizer = load_tokenizer(model)
    question = load_prompt_set("mtbench", limit=1)[0].turns[0]
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"])
    return torch.tensor([(ids * (context // len(ids) + 1))[-context:]])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class ChainStep:
    """The parts of one chain step on a fixed prefix (each call leaves both caches as it found them)."""

    def __init__(self, target, draft, input_ids: torch.Tensor):
        self.target, self.draft, self.n = target, draft, input_ids.shape[1]
        self.aux = list(draft.config.aux_layer_ids)
        self.cache, self.draft_cache = new_target_cache(target), DraftCache()
        self.root, rows = prefill(target, draft, input_ids, self.cache, self.draft_cache, SpecSettings(mode="chain"))
        self.root_hidden = rows[0, -1:]

    def rewind(self) -> None:
        """Drop what a timed forward appended to the target's cache (its layers hold prefix views)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, : self.n], layer.values[:, :, : self.n]

    def plain(self) -> None:
        ids, positions = torch.tensor([[self.root]]), torch.tensor([[self.n]])
        target_forward(self.target, ids, positions, self.cache, last_only=True)
        self.rewind()

    def chain(self, k: int):
        tree = draft_tree(self.draft, self.root_hidden, self.draft_cache, self.n, (k, 1, k + 1))
        self.draft_cache.crop(self.n)
        return tree

    def verify(self, tree, mask: bool = True) -> None:
        """mask=False: a chain's tree mask is causal, so the forward can go without it (a diagnosis)."""
        ids = torch.cat([torch.tensor([self.root]), tree.tokens])[None]
        target_forward(self.target, ids, tree.position_ids(self.n), self.cache,
                       tree.attention_mask(self.n) if mask else None, aux_layer_ids=self.aux)
        self.rewind()

    def commit(self) -> None:
        features = torch.zeros(1, 2, self.target.config.get_text_config().hidden_size * len(self.aux))
        positions = torch.arange(self.n, self.n + 2)[None]
        self.draft(torch.tensor([[self.root, self.root]]), self.draft.project(features), positions, self.draft_cache)
        self.draft_cache.crop(self.n)


def measure(step: ChainStep, max_k: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of every part, the parts interleaved in each round so load hits all alike."""
    trees = {k: step.chain(k) for k in range(1, max_k + 1)}
    parts = {"plain": step.plain, "commit": step.commit}
    for k in range(1, max_k + 1):
        parts[f"draft({k})"] = lambda k=k: step.chain(k)
        parts[f"verify({k + 1})"] = lambda k=k: step.verify(trees[k])
        parts[f"verify({k + 1}), no mask"] = lambda k=k: step.verify(trees[k], mask=False)
    times = {name: [] for name in parts}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, part in parts.items():
                seconds = timed(part)
                if round_ >= warmup:
                    times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def predict(costs: dict[str, float], acceptance: list[float], max_k: int) -> list[dict]:
    """Chain speedup per k from per-position acceptance (the share of steps accepting > i tokens)."""
    rows, plain = [], costs["plain"]
    for k in range(1, max_k + 1):
        step = costs[f"draft({k})"] + costs[f"verify({k + 1})"] + costs["commit"]
        tau = 1 + sum(acceptance[:k]) if acceptance else None
        rows.append({"k": k, "step_over_plain": step / plain, "tau": tau,
                     "speedup": tau * plain / step if tau else None,
                     "tau_for_1.0x": step / plain, "tau_for_1.5x": 1.5 * step / plain})
    return rows


def report(costs: dict[str, float], rows: list[dict]) -> str:
    lines = ["| part | median ms | / plain step |", "|---|---|---|"]
    lines += [f"| {name} | {1000 * s:.1f} | {s / costs['plain']:.2f} |" for name, s in costs.items()]
    lines += ["", "| k | chain step / plain step | τ(k) of the draft | predicted speedup | τ for 1.0x | τ for 1.5x |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        tau = f"{r['tau']:.3f}" if r["tau"] else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {r['k']} | {r['step_over_plain']:.2f} | {tau} | {speedup} | {r['tau_for_1.0x']:.2f} | "
                     f"{r['tau_for_1.5x']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--draft", required=True, help="BaldEagle draft folder")
    parser.add_argument("--score", default="", help="score.json of this draft (per-position acceptance)")
    parser.add_argument("--context", type=int, default=300, help="tokens already in the cache")
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="runs/decode_cost.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target, draft = load_target(args.model), load_draft(args.draft).eval()
    step = ChainStep(target, draft, context_ids(args.model, args.context))
    costs = measure(step, args.max_k, args.repeats, args.warmup)
    acceptance = json.loads(Path(args.score).read_text())["per_position_acceptance"] if args.score else []
    rows = predict(costs, acceptance, min(args.max_k, len(acceptance) or args.max_k))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "threads": torch.get_num_threads(),
                                          "seconds": costs, "chain": rows}, indent=2) + "\n")
    print(report(costs, rows))


if __name__ == "__main__":
    main()
