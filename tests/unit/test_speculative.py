"""Speculative decoding: greedy output equals the target's own greedy output token for token (random,
trained and perfect drafts; chain and tree; EOS and max_new_tokens in the middle of an accepted
run), a perfect draft reaches the maximum acceptance, and sampling is lossless (statistically)."""

import math
from types import SimpleNamespace

import pytest
import torch
from tiny_targets import random_prompts as prompts
from tiny_targets import tiny_draft, tiny_target, train_tiny_draft

from baldeagle.decode.speculative import (
    SpecSettings,
    accept_sampling,
    plain_generate,
    speculative_generate,
    target_probs,
)
from baldeagle.decode import speculative
from baldeagle.decode.tree import tree_from_parents
from baldeagle.model.gqa_attention import use_gqa_attention
from baldeagle.model.layers import build_mask
from baldeagle.model.packed import PackedLinear, pack_linears, set_min_packed_rows


class PerfectDraft(torch.nn.Module):
    """A draft that proposes the target's own greedy tokens (it runs the target from scratch per row).

    It follows the draft API. The token each row reads is kept in the DraftCache (as a fake key),
    so the decoder's crop and tree bookkeeping apply to it as to a real draft; a row's context is
    x_0 plus the tokens of the rows its attention mask lets it see. Its "logits" are a sharp
    one-hot (log-probability ≈ 0 for the target's argmax), so the top-1 path always survives the rerank.
    """

    def __init__(self, target, first_token: int):
        super().__init__()
        self.target, self.first_token = target, first_token
        self.config = SimpleNamespace(aux_layer_ids=[target.config.num_hidden_layers])
        self.memo: dict[tuple[int, ...], int] = {}  # context → the target's greedy choice

    def project(self, features):
        return features

    def forward(self, input_ids, hidden, position_ids, cache=None, attention_mask=None):
        past = len(cache)
        tokens = input_ids[:, None, :, None].to(torch.float64)  # [1, 1, T, 1] stored as a fake key
        cache.append(tokens, tokens)
        row_tokens = cache.k[0, 0, :, 0].long()  # [S]
        mask = build_mask(attention_mask, input_ids.shape[1], past, input_ids.device)[0, 0]  # [T, S]
        out = []
        for i in range(input_ids.shape[1]):
            context = tuple([self.first_token] + row_tokens[mask[i]].tolist())
            if context not in self.memo:
                self.memo[context] = int(self.target(torch.tensor([context])).logits[0, -1].argmax())
            best = self.memo[context]
            out.append(torch.full((self.target.config.vocab_size,), -30.0).index_fill(0, torch.tensor([best]), 0.0))
        return torch.stack(out)[None]  # [1, T, V]

    def logits(self, out):
        return out

    def to_target_ids(self, ids):
        return ids


def reference_greedy(target, ids, max_new_tokens, eos=None):
    out = target.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    return out[0, ids.shape[1]:].tolist()


SHAPES = {
    "chain": dict(mode="chain", num_draft_tokens=4),
    "tree": dict(mode="tree", tree_depth=4, tree_topk=3, tree_total_tokens=12),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_equals_generate_with_random_drafts(family, draft_type, mode):
    target = tiny_target(family)
    draft, _ = tiny_draft(target, draft_type)
    for ids in prompts(4, seed=len(family)):
        expected = reference_greedy(target, ids, 30)
        got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=30))
        assert got.tokens == expected
        assert plain_generate(target, ids, SpecSettings(max_new_tokens=30)).tokens == expected


def test_packed_linears_compute_the_same_and_decode_exactly():
    target, draft = tiny_target("qwen2"), None
    ids = prompts(1, seed=2)[0]
    expected = reference_greedy(target, ids, 30)
    with torch.no_grad():
        before = target(ids).logits
    draft, _ = tiny_draft(target, "eagle3")
    assert pack_linears(target) and pack_linears(draft)
    assert type(target.lm_head).__name__ == "PackedLinear"
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, before, atol=1e-4, rtol=1e-4)
    for mode in ["chain", "tree"]:
        got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=30))
        assert got.tokens == expected
    # verifications of up to 5 rows through MKL's path (what eval's cost model may choose): still exact
    set_min_packed_rows(target, 6)
    assert {m.min_packed_rows for m in target.modules() if isinstance(m, PackedLinear)} == {6}
    for mode in ["chain", "tree"]:
        got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=30))
        assert got.tokens == expected
    assert not pack_linears(tiny_target("llama").to(torch.bfloat16))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gqa_attention_skips_the_key_value_copy_and_decodes_exactly(family, monkeypatch):
    from transformers.integrations import sdpa_attention

    target = tiny_target(family)
    assert target.config.num_key_value_heads < target.config.num_attention_heads  # a GQA target
    draft, _ = tiny_draft(target, "eagle3")
    ids = prompts(1, seed=4)[0]
    expected = reference_greedy(target, ids, 30)
    tree = tree_from_parents(torch.tensor([5, 9, 7, 11]), torch.tensor([-1, -1, 0, 0]))
    n = ids.shape[1]

    def verify():  # a masked multi-token forward after a cached prefix, as tree verification runs it
        cache = speculative.new_target_cache(target)
        speculative.target_forward(target, ids, torch.arange(n)[None], cache)
        verify_ids = torch.cat([torch.tensor([3]), tree.tokens])[None]
        return speculative.target_forward(target, verify_ids, tree.position_ids(n), cache, tree.attention_mask(n),
                                          aux_layer_ids=[1, 3])

    copies = []
    real_repeat_kv = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: copies.append(n) or real_repeat_kv(x, n))
    with torch.no_grad():
        logits, features = verify()
        assert len(copies) == 2 * target.config.num_hidden_layers  # Transformers copies k and v in every layer
        copies.clear()
        assert use_gqa_attention(target)
        gqa_logits, gqa_features = verify()
    assert copies == []
    torch.testing.assert_close(gqa_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gqa_features, features, atol=1e-5, rtol=1e-5)
    for mode in ["chain", "tree"]:
        got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=30))
        assert got.tokens == expected
    assert not use_gqa_attention(tiny_target(family, attn_implementation="eager"))


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_perfect_draft_reaches_maximum_acceptance(mode):
    target = tiny_target("llama")
    ids = prompts(1, seed=3)[0]
    settings = SpecSettings(**SHAPES[mode], max_new_tokens=1 + 4 * 5)  # prefill token + 4 full steps
    got = speculative_generate(target, PerfectDraft(target, int(ids[0, 0])), ids, settings)
    assert got.tokens == reference_greedy(target, ids, settings.max_new_tokens)
    assert got.accepted == [4, 4, 4, 4]  # k (chain) / depth (tree) draft tokens + 1 bonus per step


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("stop_at", [2, 5, 7, 8, 9])
def test_eos_and_max_new_tokens_in_the_middle_of_an_accepted_run(mode, stop_at):
    target = tiny_target("llama")
    ids = prompts(1, seed=5)[0]
    draft = PerfectDraft(target, int(ids[0, 0]))
    free = reference_greedy(target, ids, 20)
    # max_new_tokens: stop after `stop_at` tokens although the step accepted more
    got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=stop_at))
    assert got.tokens == free[:stop_at]
    # EOS: the first occurrence of the token at index stop_at - 1 ends the answer, EOS included
    eos = free[stop_at - 1]
    expected = reference_greedy(target, ids, 20, eos=eos)
    assert expected[-1] == eos and len(expected) <= stop_at
    settings = SpecSettings(**SHAPES[mode], max_new_tokens=20, eos_token_ids=(eos,))
    assert speculative_generate(target, draft, ids, settings).tokens == expected
    assert plain_generate(target, ids, settings).tokens == expected


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_greedy_equals_generate_with_a_trained_draft(draft_type):
    target = tiny_target("llama")
    draft = train_tiny_draft(target, draft_type)
    accepted, steps = 0, 0
    for mode in ["chain", "tree"]:
        for ids in prompts(6, seed=11):  # the prompts it was trained on, so the draft agrees often
            got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=40))
            assert got.tokens == reference_greedy(target, ids, 40)
            accepted += sum(got.accepted)
            steps += got.steps
    assert accepted / steps > 0.5  # the draft is useful, so long accepted runs were exercised


@pytest.mark.parametrize("options", [dict(fc_norm=True, feed_normed_hidden=True),
                                     dict(norm_before_fc=True, feed_normed_hidden=True)], ids=lambda o: "+".join(o))
def test_greedy_equals_generate_with_eagle31_drafts(options):
    """EAGLE 3.1's norms and post-norm state fed back: decoding stays exact, random or trained draft."""
    target = tiny_target("llama")
    random_draft, _ = tiny_draft(target, "eagle3", **options)
    draft = train_tiny_draft(target, "eagle3", **options)
    accepted = []
    for mode in ["chain", "tree"]:
        for ids in prompts(6, seed=11):  # the trained draft's own prompts: long accepted runs
            expected = reference_greedy(target, ids, 40)
            got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=40))
            assert got.tokens == expected
            accepted += got.accepted
            assert speculative_generate(target, random_draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=40)
                                        ).tokens == expected
    assert sum(accepted) / len(accepted) > 0.5 and max(accepted) >= 3  # deep steps read the fed-back state


# ------------------------------------------------------------------------------------------
# Sampling is lossless
# ------------------------------------------------------------------------------------------


def tv_bound(cells: int, samples: int, delta: float = 1e-6) -> float:
    """Total-variation radius that an exact sampler exceeds with probability < delta.

    Weissman et al. (2003): P(||p̂ - p||_1 >= eps) <= (2^K - 2) exp(-n eps^2 / 2); TV = L1 / 2.
    """
    return 0.5 * math.sqrt(2 * (cells * math.log(2) + math.log(1 / delta)) / samples)


def wrong_sampler(zero_rejected: bool, renormalise: bool):
    """`accept_sampling` with a deliberate bug, for checking that the tests' bound catches it:
    zero_rejected=False resamples from p instead of normalise(max(p - q, 0)); renormalise=False
    accepts a later sibling x with the original p(x) instead of p(x) renormalised after rejections."""

    def sample(tree, logits, temperature, top_p, generator=None):
        row, path = 0, [0]
        while True:
            p = target_probs(logits[row], temperature, top_p).cpu()
            for child in tree.children(row):
                x = int(tree.tokens[child - 1])
                if float(torch.rand((), generator=generator)) * (float(p.sum()) if renormalise else 1.0) < float(p[x]):
                    row = child
                    path.append(child)
                    break
                p[x] = 0.0 if zero_rejected else p[x]
            else:
                return torch.tensor(path), int(torch.multinomial(p, 1, generator=generator))

    return sample


WRONG_SAMPLERS = {"resamples from p": wrong_sampler(zero_rejected=False, renormalise=True),
                  "does not renormalise": wrong_sampler(zero_rejected=True, renormalise=False)}


def sibling_case():
    """A fixed tree and fixed target logits; rows: 0 root; three siblings below it: tokens 0, 1, 2
    (rows 1, 2, 3); row 1 has children tokens 3, 4 (rows 4, 5); row 2 has child token 5 (row 6);
    row 4 has child token 1 (row 7). → (tree, logits [8, V], p [8, V], temperature, top_p)"""
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(8, 6, generator=g)
    logits[0, :3] = logits[0].max() + torch.tensor([0.5, 0.0, -0.5])  # the drafted siblings are likely
    tree = tree_from_parents(torch.tensor([0, 1, 2, 3, 4, 5, 1]), torch.tensor([-1, -1, -1, 0, 0, 1, 3]))
    temperature, top_p = 0.8, 0.9
    return tree, logits, target_probs(logits, temperature, top_p), temperature, top_p


def emitted_counts(sampler, n: int, seed: int = 0):
    """n draws of `sampler` on `sibling_case` → (counts of the first emitted token [V], counts of the
    second one keyed by the accepted first token {0, 1, 2: [V]})."""
    tree, logits, p, temperature, top_p = sibling_case()
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(p.shape[1])
    second = {0: torch.zeros(p.shape[1]), 1: torch.zeros(p.shape[1]), 2: torch.zeros(p.shape[1])}
    for _ in range(n):
        path, bonus = sampler(tree, logits, temperature, top_p, g)
        emitted = [int(tree.tokens[r - 1]) for r in path[1:]] + [bonus]
        first[emitted[0]] += 1
        if len(path) > 1:
            second[emitted[0]][emitted[1]] += 1
    return first, second


ACCEPT_SAMPLES = 20000


def test_accept_sampling_emits_the_target_distribution():
    """A fixed tree and fixed target logits: the first emitted token follows p at the root, and the
    token after an accepted draft x follows p at x's row (whether drafted again or resampled)."""
    _, _, p, _, _ = sibling_case()  # [8, V]
    vocab, n = p.shape[1], ACCEPT_SAMPLES
    first, second = emitted_counts(accept_sampling, n)
    assert 0.5 * (first / n - p[0]).abs().sum() < tv_bound(vocab, n)
    for token, row in {0: 1, 1: 2, 2: 3}.items():
        count = int(second[token].sum())
        assert count > 500
        assert 0.5 * (second[token] / count - p[row]).abs().sum() < tv_bound(vocab, count)


@pytest.mark.parametrize("bug", list(WRONG_SAMPLERS))
def test_the_bound_rejects_a_wrong_residual_distribution(bug):
    """The lossless test can fail: with the same sample size, a sampler whose residual is wrong
    emits a first token whose distance from p is well past `tv_bound`."""
    _, _, p, _, _ = sibling_case()
    vocab, n = p.shape[1], ACCEPT_SAMPLES
    first, _ = emitted_counts(WRONG_SAMPLERS[bug], n)
    assert 0.5 * (first / n - p[0]).abs().sum() > 2 * tv_bound(vocab, n)


def exact_two_token_distribution(target, ids, temperature, top_p):
    """P(x_n, x_{n+1}) of plain sampling, by enumeration over a tiny vocabulary: [V, V]."""
    with torch.no_grad():
        p_first = target_probs(target(ids).logits[0, -1], temperature, top_p)  # [V]
        vocab = p_first.shape[0]
        batch = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        p_second = target_probs(target(batch).logits[:, -1], temperature, top_p)  # [V, V]
    return p_first[:, None] * p_second


GENERATE_SAMPLES = 4000


def two_token_counts(mode: str, top_p: float, n: int = GENERATE_SAMPLES):
    """n speculative samplings of two tokens on an 8-token vocabulary with a perfect draft →
    (counts [V, V] of the first two emitted tokens, plain sampling's exact P [V, V], the fraction
    of first steps that accepted a draft token)."""
    target = tiny_target("llama", vocab_size=8, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)  # peaked distributions, so drafts get accepted and rejected
    ids = torch.tensor([[5, 3, 7, 4]])
    temperature = 1.0
    exact = exact_two_token_distribution(target, ids, temperature, top_p)  # [V, V]
    draft = PerfectDraft(target, int(ids[0, 0]))
    # two tokens are emitted, so shallow drafts suffice (deeper nodes are verified but never kept)
    shape = dict(mode="tree", tree_depth=2, tree_topk=3, tree_total_tokens=6) if mode == "tree" else dict(
        mode="chain", num_draft_tokens=2)
    settings = SpecSettings(**shape, max_new_tokens=2, temperature=temperature, top_p=top_p)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros_like(exact)
    accepted_steps = 0
    for _ in range(n):
        got = speculative_generate(target, draft, ids, settings, generator=g)
        counts[got.tokens[0], got.tokens[1]] += 1
        accepted_steps += got.accepted[0] > 0
    return counts, exact, accepted_steps / n


@pytest.mark.parametrize("mode,top_p", [("chain", 1.0), ("tree", 0.9)])
def test_speculative_sampling_matches_plain_sampling(mode, top_p):
    """End to end on an 8-token vocabulary: the first two emitted tokens are jointly distributed as
    plain sampling's, and so is the token after an accepted draft (the perfect draft's guess)."""
    n = GENERATE_SAMPLES
    counts, exact, accepted = two_token_counts(mode, top_p, n)
    assert 0.1 < accepted < 0.95  # both branches (accept, reject) were exercised
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < tv_bound(exact.numel(), n)


def test_speculative_sampling_test_rejects_resampling_from_p(monkeypatch):
    """The end-to-end test can fail: decoding that resamples a rejected token from p instead of the
    residual is, at the same sample size, well past the bound."""
    monkeypatch.setattr(speculative, "accept_sampling", WRONG_SAMPLERS["resamples from p"])
    n = GENERATE_SAMPLES
    counts, exact, _ = two_token_counts("chain", 1.0, n)
    assert 0.5 * (counts / n - exact).abs().sum() > 1.5 * tv_bound(exact.numel(), n)


def test_sliding_window_targets_are_refused():
    target = tiny_target("mistral", sliding_window=32)  # Mistral v0.1's layout
    draft, _ = tiny_draft(target, "eagle3")
    with pytest.raises(ValueError, match=r"DynamicSlidingWindowLayer in layers \[0, 1, 2, 3, 4, 5\].*full-attention"):
        speculative_generate(target, draft, prompts(1)[0], SpecSettings(max_new_tokens=4))


def test_settings_are_validated():
    for bad, match in [
        (dict(num_draft_tokens=0), "num_draft_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(mode="beam"), "mode"),
        (dict(tree_total_tokens=1), "tree_total_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpecSettings(**bad)
