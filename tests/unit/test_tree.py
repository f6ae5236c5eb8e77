"""Draft trees: EAGLE-2 growth and rerank, tree masks and positions, greedy path retrieval, and KV
compaction checked against the target run from scratch on prefix + accepted path."""

import pytest
import torch
from tiny_targets import tiny_target

from baldeagle.decode.speculative import new_target_cache, target_forward
from baldeagle.decode.tree import accept_greedy, compact_target_cache, grow_tree, tree_from_parents

V = 50


def path_logp(path: tuple[int, ...]) -> torch.Tensor:
    """A deterministic fake draft: log-probabilities [V] that depend on the whole path."""
    g = torch.Generator().manual_seed(hash(path) % (2**31))
    return torch.log_softmax(3 * torch.randn(V, generator=g), dim=-1)


class FakeExpander:
    """Stands in for the draft: checks the row masks `grow_tree` passes and scores children by path."""

    def __init__(self):
        self.row_paths: list[tuple[int, ...]] = []  # draft row → token path from the root
        self.calls = 0

    def __call__(self, tokens, parent_rows, depth, row_mask):
        self.calls += 1
        k = tokens.shape[0]
        assert row_mask.shape == (k, len(self.row_paths) + k)
        new_paths = []
        for i in range(k):
            parent = () if parent_rows[i] < 0 else self.row_paths[parent_rows[i]]
            path = parent + (int(tokens[i]),)
            assert len(path) == depth
            new_paths.append(path)
        self.row_paths += new_paths
        for i, path in enumerate(new_paths):  # a row sees exactly the rows of its path prefixes
            seen = {self.row_paths[r] for r in torch.nonzero(row_mask[i]).flatten().tolist()}
            assert seen == {path[:j] for j in range(1, len(path) + 1)}
        return torch.stack([path_logp(p) for p in new_paths])


def node_paths(tree):
    paths = []
    for j in range(tree.num_nodes):
        parent = int(tree.parents[j])
        paths.append((paths[parent] if parent >= 0 else ()) + (int(tree.tokens[j]),))
    return paths


def all_candidates(depth, topk):
    """Every candidate EAGLE-2 scores (frontier = top-k per depth by cumulative log-probability)."""
    candidates, frontier = {}, [((), 0.0)]
    for _ in range(depth):
        children = []
        for path, score in frontier:
            logp = path_logp(path)
            top = logp.topk(topk)
            for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                children.append((path + (tok,), score + lp))
        candidates.update(children)
        frontier = sorted(children, key=lambda c: -c[1])[:topk]
    return candidates


@pytest.mark.parametrize("depth,topk,total", [(1, 3, 3), (3, 2, 6), (5, 4, 24), (4, 3, 100), (6, 1, 7)])
def test_grow_tree_keeps_the_best_candidates_and_closes_ancestors(depth, topk, total):
    expander = FakeExpander()
    tree = grow_tree(expander, path_logp(()), lambda ids: ids, depth, topk, total)
    assert expander.calls == depth - 1
    candidates = all_candidates(depth, topk)
    paths = node_paths(tree)
    assert tree.num_nodes == min(total - 1, len(candidates)) == len(set(paths))
    # every node is a real candidate with its cumulative draft score, and its parent is kept
    for j, path in enumerate(paths):
        assert abs(candidates[path] - float(tree.scores[j])) < 1e-4
        assert len(path) == int(tree.depths[j])
        if len(path) > 1:
            assert path[:-1] in paths
    # and the kept set is the global top by score
    kept = sorted(candidates[p] for p in paths)
    dropped = [s for p, s in candidates.items() if p not in set(paths)]
    if dropped:
        assert max(dropped) <= kept[0] + 1e-6
    assert tree.max_depth <= depth


def test_chain_is_a_degenerate_tree_with_a_causal_mask():
    tree = tree_from_parents(torch.tensor([7, 8, 9]), torch.tensor([-1, 0, 1]))  # node i's parent is i-1
    assert tree.parents.tolist() == [-1, 0, 1] and tree.depths.tolist() == [1, 2, 3]
    assert torch.equal(tree.ancestors, torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.position_ids(10).tolist() == [[10, 11, 12, 13]]
    mask = tree.attention_mask(5)
    assert mask.shape == (1, 1, 4, 9) and bool(mask[0, 0, :, :5].all())
    grown = grow_tree(FakeExpander(), path_logp(()), lambda ids: ids, depth=4, topk=1, total_tokens=5)
    assert grown.parents.tolist() == [-1, 0, 1, 2]


def test_tree_mask_positions_and_children():
    #        root
    #       /    \
    #     a(0)   b(1)
    #    /   \     \
    #  c(2)  d(3)  e(4)
    #   |
    #  f(5)
    tree = tree_from_parents(torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([-1, -1, 0, 0, 1, 2]))
    assert tree.depths.tolist() == [1, 1, 2, 2, 2, 3]
    assert tree.position_ids(4).tolist() == [[4, 5, 5, 6, 6, 6, 7]]
    assert torch.nonzero(tree.ancestors[6]).flatten().tolist() == [0, 1, 3, 6]  # f: root, a, c, f
    assert torch.nonzero(tree.ancestors[5]).flatten().tolist() == [0, 2, 5]  # e: root, b, e
    assert tree.children(0) == [1, 2] and tree.children(1) == [3, 4] and tree.children(6) == []
    with pytest.raises(ValueError, match="depth order"):
        tree_from_parents(torch.tensor([1, 2]), torch.tensor([1, -1]))


def test_accept_greedy_follows_the_target():
    tree = tree_from_parents(torch.tensor([10, 11, 12, 13, 14, 15]), torch.tensor([-1, -1, 0, 0, 1, 2]))
    # rows: root, a, b, c, d, e, f. The target picks 10 (a) at the root, 12 (c) after a, 15 (f) after c.
    argmax = torch.tensor([10, 12, 14, 15, 0, 0, 42])
    path, bonus = accept_greedy(tree, argmax)
    assert path.tolist() == [0, 1, 3, 6] and bonus == 42
    # a wrong node below a correct one stops the path there (b's child e is right, b is not)
    argmax = torch.tensor([99, 12, 14, 0, 0, 0, 0])
    path, bonus = accept_greedy(tree, argmax)
    assert path.tolist() == [0] and bonus == 99
    argmax = torch.tensor([11, 0, 14, 0, 0, 7, 0])
    path, bonus = accept_greedy(tree, argmax)
    assert path.tolist() == [0, 2, 5] and bonus == 7


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tree_verification_and_compaction_match_a_fresh_forward(family):
    target = tiny_target(family)
    torch.manual_seed(0)
    prefix = torch.randint(3, 256, (1, 9))
    root = 77
    tree = tree_from_parents(
        torch.tensor([5, 6, 7, 8, 9, 10, 11]), torch.tensor([-1, -1, 0, 0, 1, 2, 5])
    )  # deepest path: root → 5 → 7 → 10 → 11 (rows 1, 3, 6, 7)
    n = prefix.shape[1]
    with torch.inference_mode():
        cache = new_target_cache(target)
        target_forward(target, prefix, torch.arange(n)[None], cache)
        ids = torch.cat([torch.tensor([root]), tree.tokens])[None]
        logits, features = target_forward(target, ids, tree.position_ids(n), cache, tree.attention_mask(n), [6])
        # each row's logits equal a from-scratch forward over prefix + its root→row path
        for row in range(tree.num_nodes + 1):
            rows = torch.nonzero(tree.ancestors[row]).flatten()
            full = torch.cat([prefix[0], ids[0, rows]])[None]
            expected = target(full).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)
        # compaction keeps prefix + path; the cache equals the one a sequential run builds
        path = torch.tensor([0, 1, 3, 6, 7])
        compact_target_cache(cache, n, path)
        reference = new_target_cache(target)
        target_forward(target, torch.cat([prefix[0], ids[0, path]])[None], torch.arange(n + 5)[None], reference)
        assert cache.get_seq_length() == n + 5
        for got, want in zip(cache.layers, reference.layers):
            torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
        # and decoding continues from it exactly as from the reference cache
        nxt = torch.tensor([[3]])
        a, _ = target_forward(target, nxt, torch.tensor([[n + 5]]), cache)
        b, _ = target_forward(target, nxt, torch.tensor([[n + 5]]), reference)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compaction_of_a_chain_prefix_only_crops():
    target = tiny_target("llama")
    with torch.inference_mode():
        cache = new_target_cache(target)
        target_forward(target, torch.randint(3, 256, (1, 12)), torch.arange(12)[None], cache)
        before = cache.layers[0].keys.clone()
        compact_target_cache(cache, 8, torch.tensor([0, 1]))
        assert cache.get_seq_length() == 10
        torch.testing.assert_close(cache.layers[0].keys, before[:, :, :10])
