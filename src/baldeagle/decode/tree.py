"""Draft trees: EAGLE-2 dynamic trees, and the chain as a tree with one child per node (topk 1).

A tree hangs below a *root*: the last committed token, which the target has not seen yet. Its N
draft nodes are stored in depth order (a parent always precedes its children), so "row" 0 is the
root and row j+1 is node j in every [N+1]-sized tensor (the verification input, target logits).

EAGLE-2 growth (`grow_tree`): the draft scores a node by the cumulative log-probability of its
path. At depth 1 the top-k tokens of the root's draft distribution are candidates; at each further
depth the k best candidates of the previous depth (the frontier) run through the draft together
and each proposes its top-k children (k·k candidates). Finally the best `total_tokens - 1`
candidates over all depths are kept. A child's score never exceeds its parent's (log-probabilities
are ≤ 0), and a stable sort puts a parent first on ties, so the kept set always contains the
ancestors of every kept node.

Verification runs the target once on [root, nodes] at positions prefix_len + depth under
`Tree.attention_mask`: each row sees the cached prefix, its ancestors and itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Tree:
    tokens: torch.Tensor  # [N] target token ids of the draft nodes
    parents: torch.Tensor  # [N] parent node index, -1 = the root
    depths: torch.Tensor  # [N] 1..D (the root has depth 0)
    ancestors: torch.Tensor  # [N+1, N+1] bool: row i marks itself and all its ancestors (root = row 0)
    scores: torch.Tensor | None = None  # [N] draft cumulative log-probabilities, if known

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if self.num_nodes else 0

    def position_ids(self, root_position: int) -> torch.Tensor:
        """[1, N+1]: the root at `root_position`, each node at root_position + depth."""
        depths = torch.cat([self.depths.new_zeros(1), self.depths])
        return (depths + root_position)[None]

    def attention_mask(self, prefix_len: int) -> torch.Tensor:
        """bool [1, 1, N+1, prefix_len + N+1] (True = attend): the cached prefix, ancestors and self."""
        rows = self.ancestors.shape[0]
        prefix = torch.ones(rows, prefix_len, dtype=torch.bool, device=self.ancestors.device)
        return torch.cat([prefix, self.ancestors], dim=1)[None, None]

    def children(self, row: int) -> list[int]:
        """Rows of the children of `row`, in node order (for EAGLE-2 trees: best draft score first)."""
        return (torch.nonzero(self.parents == row - 1).flatten() + 1).tolist()


def tree_from_parents(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor | None = None) -> Tree:
    """A Tree from node tokens [N] and parent indices [N] (-1 = root; each parent precedes its child)."""
    n = tokens.shape[0]
    device = tokens.device
    if n and bool((parents >= torch.arange(n, device=device)).any()):
        raise ValueError("tree nodes must be in depth order: every parent index must precede its child")
    depths = torch.zeros(n, dtype=torch.long, device=device)
    ancestors = torch.eye(n + 1, dtype=torch.bool, device=device)
    ancestors[1:, 0] = True
    parent_rows = (parents + 1).tolist()
    depth_list = depths.tolist()
    for j, parent_row in enumerate(parent_rows):  # N ≤ a few dozen; parents come first
        ancestors[j + 1] |= ancestors[parent_row]
        depth_list[j] = (depth_list[parent_row - 1] if parent_row else 0) + 1
    depths = torch.tensor(depth_list, dtype=torch.long, device=device)
    return Tree(tokens, parents, depths, ancestors, scores)


# Expand the frontier: (tokens [k] target ids, parent_rows [k] (-1 = root), depth d, row_mask [k, R])
# → draft log-probabilities of their children [k, V_draft]. `row_mask` says which of the R draft
# rows of this tree so far (previous frontiers, then these k) each new row may attend to.
ExpandFn = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]


def grow_tree(
    expand: ExpandFn,
    root_logp: torch.Tensor,
    to_target: Callable[[torch.Tensor], torch.Tensor],
    depth: int,
    topk: int,
    total_tokens: int,
) -> Tree:
    """EAGLE-2 dynamic tree from the root's draft log-probabilities `root_logp` [V_draft].

    `depth` is the longest path (draft tokens), `topk` the children per expanded node, and
    `total_tokens` the verified size including the root. A chain of k tokens is
    `grow_tree(..., depth=k, topk=1, total_tokens=k+1)`. `to_target` maps draft ids to target ids.
    Cost: depth-1 calls of `expand`, each over `topk` rows.
    """
    k = min(topk, root_logp.shape[-1])
    device = root_logp.device
    score, draft_ids = root_logp.topk(k)  # [k] cumulative log-probabilities of the depth-1 candidates
    frontier_tokens = to_target(draft_ids)  # [k] target ids of the nodes expanded next
    tokens, scores = [frontier_tokens], [score]
    parents = [torch.full((k,), -1, dtype=torch.long, device=device)]
    frontier = torch.arange(k, device=device)  # candidate ids of the frontier
    parent_rows = torch.full((k,), -1, dtype=torch.long, device=device)  # draft rows of their parents
    row_mask = torch.eye(k, dtype=torch.bool, device=device)  # [R, R]: rows see ancestor rows + self
    num_candidates = k
    for d in range(1, depth):
        rows = row_mask.shape[0]  # the frontier occupies the last k rows
        child_logp = expand(frontier_tokens, parent_rows, d, row_mask[rows - k :])  # [k, V_draft]
        child_score, child_ids = child_logp.topk(k, dim=-1)  # [k, k]
        cumulative = (score[:, None] + child_score).flatten()  # [k*k] path scores of the children
        child_tokens = to_target(child_ids.flatten())
        tokens.append(child_tokens)
        scores.append(cumulative)
        parents.append(frontier.repeat_interleave(k))
        # The next frontier: the k best children; their draft rows will follow the current ones.
        score, best = cumulative.topk(k)
        frontier, frontier_tokens = num_candidates + best, child_tokens[best]
        parent_rows = rows - k + best // k
        num_candidates += k * k
        new = torch.zeros(k, rows + k, dtype=torch.bool, device=device)
        new[:, :rows] = row_mask[parent_rows]
        new[:, rows:] = torch.eye(k, dtype=torch.bool, device=device)
        row_mask = torch.cat([torch.nn.functional.pad(row_mask, (0, k)), new], 0)
    all_tokens, all_scores, all_parents = torch.cat(tokens), torch.cat(scores), torch.cat(parents)
    keep = min(total_tokens - 1, num_candidates)
    if keep < num_candidates:
        # Global rerank; stable, so on equal scores the shallower node (a parent) wins.
        order = torch.sort(all_scores, descending=True, stable=True).indices[:keep]
        kept = order.sort().values  # back to depth order
    else:
        kept = torch.arange(num_candidates, device=all_scores.device)
    remap = torch.full((num_candidates + 1,), -1, dtype=torch.long, device=kept.device)
    remap[kept] = torch.arange(kept.shape[0], device=kept.device)
    kept_parents = remap[all_parents[kept]]  # -1 (root) maps through remap[-1] = -1
    return tree_from_parents(all_tokens[kept], kept_parents, all_scores[kept])


def accept_greedy(tree: Tree, target_tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Longest root→node path the target agrees with, greedily.

    target_tokens [N+1]: the target's argmax at each row. A node is correct when its token is the
    target's choice at its parent; it is accepted when it and all its ancestors are correct (siblings
    hold distinct tokens, so the accepted nodes form one path). Returns (path rows [m+1], root first;
    bonus token = the target's choice after the last accepted row).
    """
    parent_rows = tree.parents + 1
    correct = torch.cat([tree.tokens.new_ones(1, dtype=torch.bool), tree.tokens == target_tokens[parent_rows]])
    accepted = ~(tree.ancestors & ~correct[None, :]).any(dim=1)  # [N+1] whole path correct
    depths = torch.cat([tree.depths.new_zeros(1), tree.depths])
    last = int(torch.where(accepted, depths, -1).argmax())
    path = torch.nonzero(tree.ancestors[last]).flatten()  # ascending rows = depth order
    return path, int(target_tokens[last])


# ------------------------------------------------------------------------------------------
# KV compaction: after verification, keep the prefix and the accepted rows only.
# ------------------------------------------------------------------------------------------


def compact_target_cache(cache, prefix_len: int, path_rows: torch.Tensor) -> None:
    """Keep a Transformers cache's first `prefix_len` entries plus the verified rows `path_rows`.

    `path_rows` index the entries appended by the verification forward (root = 0), ascending;
    the accepted path lands at positions prefix_len, prefix_len + 1, ... exactly where plain
    decoding would have written it (RoPE was applied with those positions already).
    """
    m = path_rows.shape[0]
    contiguous = bool(path_rows[-1] == m - 1)  # a chain prefix: nothing to move
    for layer in cache.layers:
        if not contiguous:
            src = path_rows + prefix_len
            layer.keys[:, :, prefix_len : prefix_len + m] = layer.keys[:, :, src]
            layer.values[:, :, prefix_len : prefix_len + m] = layer.values[:, :, src]
        layer.keys = layer.keys[:, :, : prefix_len + m]
        layer.values = layer.values[:, :, : prefix_len + m]
