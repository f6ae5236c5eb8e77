"""What a decoding step costs on this machine, and the draft shape it pays best to use: a chain of k
tokens, a depth-1 fan of the draft's w best first guesses, or a depth-2 EAGLE-2 tree.

Speculative decoding only pays when the tokens a step yields (τ) outweigh what the step costs
against one plain decoding step. Both sides depend on the machine: on a GPU verifying 8 tokens
costs about one plain step, on a 2-core CPU verifying 4 can cost 1.6x. So the shape is chosen
from measurements, not fixed:

- `measure_costs` times, on the target and draft exactly as `speculative_generate` runs them
  (same cache, tree mask, positions and feature layers), each part of a step on a real prefix:
  one plain step, drafting a chain of k (or a fan of w), verifying the root and the drafted tokens,
  and the draft reading the 2 rows a step commits; the median of interleaved rounds, so a burst of
  load hits every part alike;
- `predict_shapes` turns acceptance into τ and the speedup τ · plain / (draft + verify + commit) for
  every shape. A chain's τ(k) = 1 + Σ_{i<k} acceptance[i], from per-position acceptance (share of
  steps accepting more than i tokens, as `baldeagle score` measures it at its k); a fan's τ(w) is
  the score's `fan_acceptance_length` (a fan accepts at most one token, but a second or third guess
  often is the one: a draft whose later chain guesses are rarely right can gain more from a wider
  first step than from a longer chain); a depth-2 tree's τ is the score's `tree_acceptance_length`
  (a fan plus the best few second guesses: a draft trained with two TTT steps gets some of them right);
- `best_shape` picks the shape with the highest predicted speedup (on a tie, the fewer drafted
  tokens, a chain before a fan).

On a CPU, `eval` pre-packs the float32 linear weights (`baldeagle.model.packed`): a forward over
many rows then costs little more than one, but for 2-3 rows MKL's own path can be faster (one 2-core
Xeon: verifying 2 tokens 1.45x a plain step packed, 1.11x through MKL). With a packed target the
verifications are also timed through MKL's path, the prediction takes the faster of the two for
each shape, and `apply_choice` sets the target to decode that way.

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
from baldeagle.model.packed import PackedLinear, min_packed_rows, set_min_packed_rows

UNPACKED = ", unpacked"  # suffix of the verifications timed through MKL's path
# MKL's path re-packs the weight on every call; it has been faster than the packed one for 2-3 rows
# on one CPU and never past that, so wider verifications are timed packed only.
MAX_UNPACKED_ROWS = 5


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class ChainStep:
    """The parts of one chain (or fan) step on a fixed prefix [1, n]; each call leaves both caches as it found them."""

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

    def fan(self, width: int):
        tree = draft_tree(self.draft, self.root_hidden, self.draft_cache, self.n, (1, width, width + 1))
        self.draft_cache.crop(self.n)
        return tree

    def tree(self, topk: int, total_tokens: int):
        """A depth-2 EAGLE-2 tree: topk first guesses, each expanded once, the best total_tokens - 1 nodes."""
        tree = draft_tree(self.draft, self.root_hidden, self.draft_cache, self.n, (2, topk, total_tokens))
        self.draft_cache.crop(self.n)
        return tree

    def verify(self, tree, mask: bool = True, packed: bool = True) -> None:
        """mask=False: a chain's tree mask is causal, so the forward can go without it (a diagnosis);
        packed=False: a packed target's linears take MKL's path for this forward."""
        ids = torch.cat([torch.tensor([self.root]), tree.tokens])[None]
        before = min_packed_rows(self.target)
        if not packed:
            set_min_packed_rows(self.target, ids.shape[1] + 1)
        try:
            target_forward(self.target, ids, tree.position_ids(self.n), self.cache,
                           tree.attention_mask(self.n) if mask else None, aux_layer_ids=self.aux)
        finally:
            set_min_packed_rows(self.target, before)
        self._rewind()

    def commit(self) -> None:
        width = self.target.config.get_text_config().hidden_size * len(self.aux)
        positions = torch.arange(self.n, self.n + 2)[None]
        self.draft(torch.tensor([[self.root, self.root]]), self.draft.project(torch.zeros(1, 2, width)), positions,
                   self.draft_cache)
        self.draft_cache.crop(self.n)


@torch.inference_mode()
def measure_costs(target, draft, input_ids: torch.Tensor, max_k: int, max_fan: int = 1, repeats: int = 10,
                  warmup: int = 2, unmasked: bool = False, trees: list[tuple[int, int]] = ()) -> dict[str, float]:
    """Median seconds of each part of a step, parts interleaved per round: "plain", "commit", and per
    chain k = 1..max_k "draft(k)" and "verify(k+1)", per fan width w = 2..max_fan "draft fan(w)" and
    "verify fan(w+1)" (a fan of 1 is a chain of 1), per depth-2 tree (topk, total) of `trees` "draft
    tree(topk)" and "verify tree(total)" (a tree's drafting cost depends on its topk, its verification's
    on its size); with a packed target each verification of up to MAX_UNPACKED_ROWS rows also through
    MKL's path (suffix ", unpacked"), with `unmasked` each chain's also without its mask."""
    step = ChainStep(target, draft, input_ids)
    packed = any(isinstance(m, PackedLinear) for m in target.modules())
    to_verify = {f"verify({k + 1})": step.chain(k) for k in range(1, max_k + 1)}
    to_verify |= {f"verify fan({w + 1})": step.fan(w) for w in range(2, max_fan + 1)}
    to_verify |= {f"verify tree({total})": step.tree(topk, total) for topk, total in trees}
    parts = {"plain": step.plain, "commit": step.commit}
    parts |= {f"draft({k})": lambda k=k: step.chain(k) for k in range(1, max_k + 1)}
    parts |= {f"draft fan({w})": lambda w=w: step.fan(w) for w in range(2, max_fan + 1)}
    parts |= {f"draft tree({k})": lambda k=k: step.tree(k, 2 * k + 1) for k in sorted({k for k, _ in trees})}
    for name, tree in to_verify.items():
        parts[name] = lambda tree=tree: step.verify(tree)
        if packed and tree.num_nodes + 1 <= MAX_UNPACKED_ROWS:
            parts[name + UNPACKED] = lambda tree=tree: step.verify(tree, packed=False)
        if unmasked and name.startswith("verify("):
            parts[name + ", no mask"] = lambda tree=tree: step.verify(tree, mask=False)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(warmup + repeats):
        for name, part in parts.items():
            seconds = _timed(part)
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def _shape_row(costs: dict[str, float], shape: str, drafted: int, draft_part: str, verify_part: str,
               tau: float | None) -> dict:
    verify, unpacked = costs[verify_part], costs.get(verify_part + UNPACKED)
    use_unpacked = unpacked is not None and unpacked < verify
    step = costs[draft_part] + (unpacked if use_unpacked else verify) + costs["commit"]
    plain = costs["plain"]
    return {"shape": shape, "drafted": drafted, "verify_unpacked": use_unpacked, "step_over_plain": step / plain,
            "tau": tau, "speedup": tau * plain / step if tau else None,
            "tau_for_1.0x": step / plain, "tau_for_1.5x": 1.5 * step / plain}


def predict_shapes(costs: dict[str, float], acceptance: list[float], max_k: int,
                   fan_taus: list[float] | None = None, max_fan: int = 1, trees: list[dict] = ()) -> list[dict]:
    """Per chain k = 1..max_k, then per fan w = 2..max_fan (τ(w) = fan_taus[w - 1]), then per depth-2
    tree of `trees` (score.json's tree_acceptance_length rows; τ None where a row has none): the step's
    cost over a plain step, τ and the predicted speedup (None without acceptance), and the τ a draft
    needs for 1.0x and 1.5x with that shape."""
    rows = [_shape_row(costs, "chain", k, f"draft({k})", f"verify({k + 1})",
                       1 + sum(acceptance[:k]) if acceptance else None) for k in range(1, max_k + 1)]
    rows += [_shape_row(costs, "fan", w, f"draft fan({w})", f"verify fan({w + 1})",
                        fan_taus[w - 1] if fan_taus else None) for w in range(2, max_fan + 1)]
    for tree in trees:
        row = _shape_row(costs, "tree", tree["total_tokens"] - 1, f"draft tree({tree['topk']})",
                         f"verify tree({tree['total_tokens']})", tree.get("tau"))
        rows.append(row | {"topk": tree["topk"]})
    return rows


def best_shape(rows: list[dict]) -> dict:
    """The row of the highest predicted speedup; on a tie the fewer drafted tokens (it costs less to be
    wrong), a chain before a fan before a tree."""
    rank = {"chain": 2, "fan": 1, "tree": 0}
    return max(rows, key=lambda r: (round(r["speedup"], 9), -r["drafted"], rank[r["shape"]]))


def settings_for(row: dict) -> dict:
    """`SpecSettings` fields that decode with `row`'s shape (a fan is a tree of depth 1)."""
    if row["shape"] == "chain":
        return {"mode": "chain", "num_draft_tokens": row["drafted"]}
    if row["shape"] == "tree":
        return {"mode": "tree", "tree_depth": 2, "tree_topk": row["topk"], "tree_total_tokens": row["drafted"] + 1}
    return {"mode": "tree", "tree_depth": 1, "tree_topk": row["drafted"], "tree_total_tokens": row["drafted"] + 1}


def apply_choice(target, row: dict) -> None:
    """Decode as predicted for `row`: its verification of drafted + 1 rows through MKL's path, or packed
    (then the one-row path stays as `choose_single_row_path` set it)."""
    if row["verify_unpacked"]:
        set_min_packed_rows(target, row["drafted"] + 2)


def shape_name(row: dict) -> str:
    if row["shape"] == "tree":
        return f"tree topk={row['topk']} n={row['drafted'] + 1}"
    return f"{row['shape']} {'k' if row['shape'] == 'chain' else 'w'}={row['drafted']}"


def format_costs(costs: dict[str, float], rows: list[dict]) -> str:
    """Markdown: each part's median and its ratio to a plain step, then the per-shape prediction."""
    plain = costs["plain"]
    lines = ["| part | median ms | / plain step |", "|---|---|---|"]
    lines += [f"| {name} | {1000 * s:.1f} | {s / plain:.2f} |" for name, s in costs.items()]
    lines += ["", "| shape | verification | step / plain step | τ | predicted speedup | τ for 1.0x | τ for 1.5x |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        tau = f"{r['tau']:.3f}" if r["tau"] else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        path = "MKL" if r["verify_unpacked"] else "packed"
        lines.append(f"| {shape_name(r)} | {path} | {r['step_over_plain']:.2f} | {tau} | {speedup} | "
                     f"{r['tau_for_1.0x']:.2f} | {r['tau_for_1.5x']:.2f} |")
    return "\n".join(lines)
