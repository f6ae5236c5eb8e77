"""Online target features equal what the full target computes (a second path through Transformers)."""

import pytest
import torch

from baldeagle.data.features import OnlineFeatures
from tiny_targets import tiny_target


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral"])
def test_online_features_match_the_full_forward(name):
    target = tiny_target(name)
    ids = torch.randint(3, 256, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    full = target(ids, attention_mask=mask, output_hidden_states=True)
    eagle3 = OnlineFeatures(target, "eagle3", [1, 3, 5])({"input_ids": ids, "attention_mask": mask})
    expected = torch.cat([full.hidden_states[i] for i in (1, 3, 5)], dim=-1)
    torch.testing.assert_close(eagle3.features, expected)
    b, p = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 3, 6, 10])
    torch.testing.assert_close(eagle3.logits[b, p], full.logits[b, p], atol=1e-5, rtol=1e-5)
    eagle1 = OnlineFeatures(target, "eagle1", [6])({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(eagle1.features, full.hidden_states[-1])


def _counting_forwards(target):
    calls = []
    target.base_model.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_cached_features_reuse_a_rows_features_without_running_the_target(draft_type):
    from baldeagle.data.features import CachedFeatures

    target = tiny_target("llama")
    online = OnlineFeatures(target, draft_type, [1, 3, 5] if draft_type == "eagle3" else [6])
    cached = CachedFeatures(OnlineFeatures(target, draft_type, online.aux_layer_ids), max_bytes=10**9)
    calls = _counting_forwards(target)
    ids = torch.randint(3, 256, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    first = {"input_ids": ids, "attention_mask": mask, "row_index": torch.tensor([7, 2, 5])}
    computed = cached(first)
    assert len(calls) == 1 and cached.misses == 3 and sorted(cached.rows) == [2, 5, 7]
    assert (computed.logits.argmax is not None) == (draft_type == "eagle3")  # the first pass's loss reads them too
    # The same rows again in another order and another padded width: served from memory.
    again = {"input_ids": torch.cat([ids[[1, 0]], torch.zeros(2, 3, dtype=ids.dtype)], dim=1),
             "attention_mask": torch.cat([mask[[1, 0]], torch.zeros(2, 3, dtype=mask.dtype)], dim=1),
             "row_index": torch.tensor([2, 7])}
    reused = cached(again)
    assert len(calls) == 1 and cached.hits == 2
    expected = online(again)  # an independent forward of the new batch
    real = again["attention_mask"].bool()
    torch.testing.assert_close(reused.features[real], expected.features[real], atol=1e-5, rtol=1e-5)
    assert not reused.features[~real].any()  # padding is zeros, as the offline store gives it
    b, p = torch.tensor([0, 1, 1]), torch.tensor([0, 4, 11])
    torch.testing.assert_close(reused.logits[b, p], expected.logits[b, p], atol=1e-5, rtol=1e-5)
    if draft_type == "eagle3":  # a reused row's loss labels: the draft vocabulary's head and the kept statistics
        from baldeagle.train.losses import draft_vocab_labels

        assert reused.logits.argmax is not None and expected.logits.argmax is None
        t2d = torch.zeros(256, dtype=torch.bool)
        t2d[torch.randperm(256)[:40]] = True
        for got, want in zip(reused.logits.draft_vocab((b, p), t2d, with_mass=True),
                             draft_vocab_labels(expected.logits[b, p], t2d, with_mass=True)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_draft_vocab_labels_from_kept_statistics_equal_the_full_head():
    """The draft-vocabulary head plus the kept full-vocabulary argmax and log-sum-exp give the loss
    the same labels as the full head, including positions whose argmax lies outside the draft vocab."""
    from baldeagle.data.features import TargetLogits, full_vocab_stats
    from baldeagle.train.losses import draft_vocab_labels

    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(2, 9, 16), torch.randn(300, 16), torch.randn(300)
    full = torch.nn.functional.linear(hidden, weight, bias)  # [2, 9, 300], the independent reference
    argmax, lse = full_vocab_stats(hidden.reshape(-1, 16), weight, bias, chunk=4)
    assert torch.equal(argmax, full.reshape(-1, 300).argmax(-1))
    t2d = torch.zeros(300, dtype=torch.bool)
    t2d[::3] = True
    t2d[full.argmax(-1)[0, :3]] = True  # some argmaxes inside, the rest mostly outside
    index = (torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 5, 1, 2, 8]))
    kept = TargetLogits(hidden, weight, bias, argmax=argmax.view(2, 9), logsumexp=lse.view(2, 9))
    probs, draft_argmax, mass = kept.draft_vocab(index, t2d, with_mass=True)
    want_probs, want_argmax, want_mass = draft_vocab_labels(full[index], t2d, with_mass=True)
    assert (want_argmax == -1).any() and (want_argmax >= 0).any()
    assert torch.equal(draft_argmax, want_argmax)
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass, want_mass, atol=1e-6, rtol=1e-5)
    assert kept.draft_vocab(index, t2d)[2] is None  # the mass only when a loss needs it (LK)
    with pytest.raises(ValueError, match="statistics"):
        TargetLogits(hidden, weight, bias).draft_vocab(index, t2d)  # without them the caller uses the full head


def test_cached_features_stop_keeping_rows_at_the_budget_and_check_token_ids():
    from baldeagle.data.features import CachedFeatures

    target = tiny_target("llama")
    # ids (int32) + 3H features + H last hidden (float32 target) + full-vocabulary argmax (int64) and log-sum-exp
    row_bytes = 10 * 4 + 10 * 64 * 4 * 4 + 10 * (8 + 4)
    cached = CachedFeatures(OnlineFeatures(target, "eagle3", [1, 3, 5]), max_bytes=2 * row_bytes)
    calls = _counting_forwards(target)
    ids = torch.randint(3, 256, (3, 10), dtype=torch.int32)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "row_index": torch.tensor([0, 1, 2])}
    cached(batch)
    assert sorted(cached.rows) == [0, 1] and cached.full and cached.bytes == 2 * row_bytes
    cached(batch)  # row 2 was not kept: the target runs again
    assert len(calls) == 2
    cached({k: v[:2] for k, v in batch.items()})
    assert len(calls) == 2
    other = dict(batch, input_ids=ids.flip(-1))
    with pytest.raises(ValueError, match="prepared row 0 came with other token ids"):
        cached({k: v[:1] for k, v in other.items()})
