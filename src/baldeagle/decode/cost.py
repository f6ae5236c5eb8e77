"""What a chain decoding step costs on this machine, and the chain length k it pays best to draft.

Speculative decoding only pays when the tokens a step yields (τ) outweigh what the step costs
against one plain decoding step. Both sides depend on the machine: on a GPU verifying 8 tokens
costs about one plain step, on a 2-core CPU verifying 4 can cost 1.6x. So the chain's k is chosen
from measurements, not fixed:

- `measure_costs` times, on the target and draft exactly as `speculative_generate` runs them
  (same cache, tree mask, positions and feature layers), each part of a chain step on a real
  prefix: one plain step, drafting a chain of k, verifying the root and k drafted tokens, and the
  draft reading the 2 rows a step commits; the median of interleaved rounds, so a burst of load
  hits every part alike;
- `predict_chain` turns per-position acceptance (share of steps accepting more than i tokens, as
  `baldeagle score` measures it at its k) into τ(k) = 1 + Σ_{i<k} acceptance[i] and the speedup
  τ(k) · plain / (draft(k) + verify(k + 1) + commit) for every k;
- `best_chain_k` picks the k with the highest predicted speedup (the shorter on a tie).

On a CPU, `eval` pre-packs the float32 linear weights (`baldeagle.model.packed`): a forward over
many rows then costs little more than one, but for 2-3 rows MKL's own path can be faster (one 2-core
Xeon: verifying 2 tokens 1.45x a plain step packed, 1.11x through MKL). With a packed target the
verifications are also timed through MKL's path, the prediction takes the faster of the two for
each k, and `apply_choice` sets the target to decode that way.

τ(k) from acceptance measured at a larger k is an approximation: a chain of k tokens restarts from
other positions than one of k' > k, but the share of steps accepting more than i tokens barely
depends on k (the yardstick's acceptance is the same draft's on the same answers).
"""

from __future__ import annotations

import statistics
import time

import torch

from baldeagle.decode.speculative import SpecSettings, draft_tree, new_target_cache, prefill, target_forward
from baldeagle.model.layers import DraftCache
from baldeagle.model.packed import PackedLinear, set_min_packed_rows

UNPACKED = ", unpacked"  # suffix of the verifications timed through MKL's path


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class ChainStep:
    """The parts of one chain step on a fixed prefix [1, n]; each call leaves both caches as it found them."""

    def __init__(self, target, draft, input_ids: torch.Tensor):
        self.target, self.draft, self.n = target, draft, input_ids.shape[1]
        self.aux = list(draft.config.aux_layer_ids)
        self.cache, self.draft_cache = new_target_cache(target), DraftCache()
        self.root, rows = prefill(target, draft, input_ids, self.cache, self.draft_cache, SpecSettings(mode="chain"))
        self.root_hidden = rows[0, -1:]

    def _rewind(self) -> None:
        """Drop what a timed forward appended to the target's cache (its layers hold prefix views)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, : self.n], layer.values[:, :, : self.n]

    def plain(self) -> None:
        ids, positions = torch.tensor([[self.root]]), torch.tensor([[self.n]])
        target_forward(self.target, ids, positions, self.cache, last_only=True)
        self._rewind()

    def chain(self, k: int):
        tree = draft_tree(self.draft, self.root_hidden, self.draft_cache, self.n, (k, 1, k + 1))
        self.draft_cache.crop(self.n)
        return tree

    def verify(self, tree, mask: bool = True, packed: bool = True) -> None:
        """mask=False: a chain's tree mask is causal, so the forward can go without it (a diagnosis);
        packed=False: a packed target's linears take MKL's path for this forward."""
        ids = torch.cat([torch.tensor([self.root]), tree.tokens])[None]
        if not packed:
            set_min_packed_rows(self.target, ids.shape[1] + 1)
        try:
            target_forward(self.target, ids, tree.position_ids(self.n), self.cache,
                           tree.attention_mask(self.n) if mask else None, aux_layer_ids=self.aux)
        finally:
            set_min_packed_rows(self.target, 2)
        self._rewind()

    def commit(self) -> None:
        width = self.target.config.get_text_config().hidden_size * len(self.aux)
        positions = torch.arange(self.n, self.n + 2)[None]
        self.draft(torch.tensor([[self.root, self.root]]), self.draft.project(torch.zeros(1, 2, width)), positions,
                   self.draft_cache)
        self.draft_cache.crop(self.n)


@torch.inference_mode()
def measure_costs(target, draft, input_ids: torch.Tensor, max_k: int, repeats: int = 10, warmup: int = 2,
                  unmasked: bool = False) -> dict[str, float]:
    """Median seconds of each part of a chain step for k = 1..max_k (keys "plain", "commit",
    "draft(k)", "verify(k+1)", with a packed target "verify(k+1), unpacked", and with `unmasked`
    "verify(k+1), no mask"), parts interleaved per round."""
    step = ChainStep(target, draft, input_ids)
    packed = any(isinstance(m, PackedLinear) for m in target.modules())
    trees = {k: step.chain(k) for k in range(1, max_k + 1)}
    parts = {"plain": step.plain, "commit": step.commit}
    for k in range(1, max_k + 1):
        parts[f"draft({k})"] = lambda k=k: step.chain(k)
        parts[f"verify({k + 1})"] = lambda k=k: step.verify(trees[k])
        if packed:
            parts[f"verify({k + 1}){UNPACKED}"] = lambda k=k: step.verify(trees[k], packed=False)
        if unmasked:
            parts[f"verify({k + 1}), no mask"] = lambda k=k: step.verify(trees[k], mask=False)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(warmup + repeats):
        for name, part in parts.items():
            seconds = _timed(part)
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def predict_chain(costs: dict[str, float], acceptance: list[float], max_k: int) -> list[dict]:
    """Per k = 1..max_k: the step's cost over a plain step, τ(k) and the predicted speedup (τ and the
    speedup are None without acceptance), and the τ a draft needs for 1.0x and 1.5x at that k."""
    rows, plain = [], costs["plain"]
    for k in range(1, max_k + 1):
        verify, unpacked = costs[f"verify({k + 1})"], costs.get(f"verify({k + 1}){UNPACKED}")
        use_unpacked = unpacked is not None and unpacked < verify
        step = costs[f"draft({k})"] + (unpacked if use_unpacked else verify) + costs["commit"]
        tau = 1 + sum(acceptance[:k]) if acceptance else None
        rows.append({"k": k, "verify_unpacked": use_unpacked, "step_over_plain": step / plain, "tau": tau,
                     "speedup": tau * plain / step if tau else None,
                     "tau_for_1.0x": step / plain, "tau_for_1.5x": 1.5 * step / plain})
    return rows


def best_chain_k(rows: list[dict]) -> int:
    """The k of the highest predicted speedup; the shorter chain on a tie (it costs less to be wrong)."""
    return max(rows, key=lambda r: (round(r["speedup"], 9), -r["k"]))["k"]


def apply_choice(target, row: dict) -> None:
    """Decode as predicted for `row`'s k: a verification of k + 1 rows through MKL's path or packed."""
    set_min_packed_rows(target, row["k"] + 2 if row["verify_unpacked"] else 2)


def format_costs(costs: dict[str, float], rows: list[dict]) -> str:
    """Markdown: each part's median and its ratio to a plain step, then the per-k prediction."""
    plain = costs["plain"]
    lines = ["| part | median ms | / plain step |", "|---|---|---|"]
    lines += [f"| {name} | {1000 * s:.1f} | {s / plain:.2f} |" for name, s in costs.items()]
    lines += ["", "| k | verification | chain step / plain step | τ(k) | predicted speedup | τ for 1.0x | τ for 1.5x |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        tau = f"{r['tau']:.3f}" if r["tau"] else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        path = "MKL" if r["verify_unpacked"] else "packed"
        lines.append(f"| {r['k']} | {path} | {r['step_over_plain']:.2f} | {tau} | {speedup} | {r['tau_for_1.0x']:.2f} | "
                     f"{r['tau_for_1.5x']:.2f} |")
    return "\n".join(lines)
