"""The EAGLE losses against hand computations."""

import math

import pytest
import torch

from baldeagle.train.losses import (
    draft_vocab_mass,
    draft_vocab_targets,
    eagle1_loss,
    eagle3_lk_loss_from_targets,
    eagle3_loss_from_targets,
    eagle3_ttt_loss,
    feature_noise,
    sharpen_probs,
    soft_cross_entropy,
    tau_sim,
)


def eagle3_step_loss(draft_logits, target_logits_full, t2d, loss_mask, num_items=None):
    """One TTT step the way `ttt_loss` scores it: the target restricted to the draft vocabulary,
    then the loss → (loss, correct, count)."""
    return eagle3_loss_from_targets(draft_logits, *draft_vocab_targets(target_logits_full, t2d), loss_mask, num_items)


def lk_step_loss(draft_logits, target_logits_full, t2d, loss_mask, num_items=None, **kwargs):
    """One TTT step scored with loss=lk, the way `ttt_loss` does it."""
    return eagle3_lk_loss_from_targets(draft_logits, *draft_vocab_targets(target_logits_full, t2d), loss_mask,
                                       num_items, target_mass=draft_vocab_mass(target_logits_full, t2d), **kwargs)


def test_soft_cross_entropy_by_hand():
    draft = torch.tensor([[1.0, 2.0, 0.0]])
    p = torch.tensor([[0.2, 0.5, 0.3]])
    z = math.log(math.e + math.e**2 + 1)
    expected = -(0.2 * (1 - z) + 0.5 * (2 - z) + 0.3 * (0 - z))
    assert soft_cross_entropy(draft, p).item() == pytest.approx(expected, rel=1e-6)


def test_sharpen_probs_by_hand():
    p = torch.tensor([[0.2, 0.5, 0.3], [0.7, 0.1, 0.2]])
    assert sharpen_probs(p, 1.0) is p  # the target's own distribution, untouched
    squared = p**2 / (p**2).sum(-1, keepdim=True)  # T = 1/2: p^2 renormalised
    torch.testing.assert_close(sharpen_probs(p, 0.5), squared)
    torch.testing.assert_close(sharpen_probs(p, 2.0), p.sqrt() / p.sqrt().sum(-1, keepdim=True))
    torch.testing.assert_close(sharpen_probs(p, 0.01), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(sharpen_probs(p, 0.3).argmax(-1), p.argmax(-1))
    zero = torch.tensor([[0.0, 0.6, 0.4]])  # a zero probability stays zero
    assert sharpen_probs(zero, 0.5)[0, 0].item() == 0.0


def test_eagle3_loss_renormalises_over_the_draft_vocab_and_drops_oov_argmax():
    t2d = torch.tensor([True, False, True, True, False])  # draft vocab = target ids 0, 2, 3
    target = torch.tensor(
        [
            [2.0, 0.0, 1.0, 0.0, 0.0],  # argmax 0: in the draft vocab
            [0.0, 5.0, 1.0, 0.0, 0.0],  # argmax 1: out of the draft vocab → no loss, counted wrong
            [0.0, 0.0, 0.0, 3.0, 0.0],  # argmax 3: in the draft vocab, but loss_mask 0
            [0.0, 0.0, 1.0, 0.0, 0.0],  # argmax 2: in
        ]
    )
    loss_mask = torch.tensor([1, 1, 0, 1])
    draft = torch.tensor(
        [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0], [0.0, 0.0, 2.0]], requires_grad=True
    )
    loss, correct, count = eagle3_step_loss(draft, target, t2d, loss_mask)

    def ce(d, t):  # target restricted to ids 0, 2, 3 and renormalised there
        p = torch.softmax(torch.tensor(t)[[0, 2, 3]], -1)
        return -(p * torch.log_softmax(torch.tensor(d), -1)).sum().item()

    expected = (ce([3.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0, 0.0]) + ce([0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 0.0, 0.0])) / 3  # / all 3 trained
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # draft argmax: row 0 → draft 0 = target 0 (right); row 3 → draft 2 = target 3, target says 2 (wrong)
    assert (int(correct), int(count)) == (1, 3)
    loss.backward()
    assert draft.grad[1].abs().sum() == 0 and draft.grad[2].abs().sum() == 0  # OOV and unmasked rows
    assert draft.grad[0].abs().sum() > 0 and draft.grad[3].abs().sum() > 0


def test_eagle3_loss_with_num_items_and_ttt_weights():
    t2d = torch.ones(4, dtype=torch.bool)
    target, draft = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    mean, _, _ = eagle3_step_loss(draft, target, t2d, mask)
    summed, _, _ = eagle3_step_loss(draft, target, t2d, mask, num_items=1)
    assert summed.item() == pytest.approx(3 * mean.item(), rel=1e-6)
    ones = [torch.tensor(1.0)] * 3
    assert eagle3_ttt_loss(ones).item() == pytest.approx(1 + 0.8 + 0.64)
    assert eagle3_ttt_loss(ones, decay=0.5).item() == pytest.approx(1.75)


def test_eagle1_smooth_l1_is_masked_and_matches_hand_computation():
    pred = torch.tensor([[[0.5, 3.0], [100.0, -100.0], [0.0, 0.0]]])
    target = torch.zeros(1, 3, 2)
    logits = torch.zeros(1, 3, 4)
    mask = torch.tensor([[1, 0, 1]])  # the huge error at position 1 must not count
    loss, metrics = eagle1_loss(pred, target, logits, logits, mask)
    l1 = [(0.5 * 0.5**2 + (3.0 - 0.5)) / 2, 0.0]  # SmoothL1 (beta 1) averaged over H, positions 0 and 2
    ce = math.log(4)  # uniform vs uniform over 4 tokens
    assert loss.item() == pytest.approx(sum(l1) / 2 + 0.1 * ce, rel=1e-6)
    assert metrics["l1_sum"].item() == pytest.approx(sum(l1), rel=1e-6)
    assert int(metrics["count"]) == 2


def test_eagle1_cross_entropy_term_carries_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, 8)
    draft_logits = torch.randn(1, 3, 5, requires_grad=True)
    target_logits = torch.randn(1, 3, 5)
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = eagle1_loss(hidden, hidden, draft_logits, target_logits, mask)  # SmoothL1 term is 0
    loss.backward()
    p, q = torch.softmax(target_logits, -1), torch.softmax(draft_logits.detach(), -1)
    expected = 0.1 * (q - p) * mask[..., None] / 2  # d(0.1 · mean CE)/d logits
    torch.testing.assert_close(draft_logits.grad, expected)
    assert draft_logits.grad[0, :2].abs().sum() > 0
    correct = (draft_logits.argmax(-1) == target_logits.argmax(-1))[0, :2].sum()
    assert int(metrics["correct"]) == int(correct) and int(metrics["count"]) == 2


def test_eagle1_regression_term_carries_gradient():
    pred = torch.randn(1, 2, 4, requires_grad=True)
    loss, _ = eagle1_loss(pred, torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2))
    loss.backward()
    assert pred.grad.abs().sum() > 0


def test_tau_sim():
    assert tau_sim([]) == 1.0
    assert tau_sim([1.0, 1.0, 1.0]) == 4.0
    assert tau_sim([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert tau_sim([0.8, 0.0, 1.0]) == pytest.approx(1.8)


def test_feature_noise():
    x = torch.zeros(2, 1024, 8)
    noisy = feature_noise(x, std=0.2, generator=torch.Generator().manual_seed(0))
    assert noisy.abs().max() <= 0.2 * 512 / 1024 / 2 + 1e-7  # U(-0.5, 0.5) · 0.2 · 512 / seq_len
    assert noisy.abs().max() > 0.04 and abs(noisy.mean().item()) < 1e-3
    assert feature_noise(x, std=0.0) is x
    assert feature_noise(x, std=0.1, kind="normal").std().item() == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError):
        feature_noise(x, kind="laplace")


# ----------------------------------------------------------------------------------------------
# loss=lk: LK^λ (arXiv 2602.23881), λ·KL(p~‖q) + (1-λ)·(1-α), α = Σ min(p, q), λ = exp(-3·sg[α])
# ----------------------------------------------------------------------------------------------


def lk_by_hand(draft_row, target_row, used, eta=3.0):
    """LK^λ for one position in plain Python: the target's full-vocab softmax, its draft-vocab part
    p (not renormalised) for the acceptance rate, renormalised p~ for the KL term."""
    full = [math.exp(x) for x in target_row]
    p = [full[i] / sum(full) for i in used]
    p_tilde = [x / sum(p) for x in p]
    q = [math.exp(x) / sum(math.exp(y) for y in draft_row) for x in draft_row]
    alpha = sum(min(a, b) for a, b in zip(p, q))
    kl = sum(a * math.log(a / b) for a, b in zip(p_tilde, q))
    weight = math.exp(-eta * alpha)
    return weight * kl + (1 - weight) * (1 - alpha)


LK_T2D = torch.tensor([True, True, False, True])  # draft vocab = target ids 0, 1, 3
LK_TARGET = torch.tensor([
    [2.0, 1.0, 0.5, 0.0],  # argmax 0, in the draft vocab
    [0.0, 0.0, 3.0, 0.0],  # argmax 2: out of the draft vocab → adds 0, stays in the denominator
    [0.0, 1.0, 0.0, 2.0],  # loss_mask 0
    [1.0, 0.0, 0.0, 0.5],  # argmax 0
])
LK_MASK = torch.tensor([1, 1, 0, 1])


def test_lk_loss_equals_a_hand_computation():
    draft = torch.tensor([[0.5, 0.0, 0.0], [0.0, 2.0, 0.0], [9.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    loss, correct, count = lk_step_loss(draft, LK_TARGET, LK_T2D, LK_MASK)
    rows = draft.detach().tolist()
    expected = (lk_by_hand(rows[0], LK_TARGET[0].tolist(), [0, 1, 3])
                + lk_by_hand(rows[3], LK_TARGET[3].tolist(), [0, 1, 3])) / 3  # / all 3 trained positions
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert (int(correct), int(count)) == (1, 3)  # row 0 right (draft 0 = target 0), row 3 wrong, row 1 OOV
    loss.backward()
    assert draft.grad[1].abs().sum() == 0 and draft.grad[2].abs().sum() == 0  # OOV and unmasked rows
    assert draft.grad[0].abs().sum() > 0 and draft.grad[3].abs().sum() > 0
    # the draft vocabulary's share of the target distribution: what α is measured against
    full = torch.softmax(LK_TARGET, -1)
    torch.testing.assert_close(draft_vocab_mass(LK_TARGET, LK_T2D), full[:, [0, 1, 3]].sum(-1))


def test_lk_loss_without_weighting_is_kl_and_its_gradient_the_kl_losss():
    """η = 0: λ = 1, the loss is KL(p~‖q) = soft cross-entropy - H(p~): the same gradient as loss=kl."""
    torch.manual_seed(0)
    target, t2d = torch.randn(5, 8), torch.rand(8) < 0.7
    t2d[0] = True
    mask = torch.tensor([1, 1, 0, 1, 1])
    draft_lk = torch.randn(5, int(t2d.sum()), requires_grad=True)
    draft_kl = draft_lk.detach().clone().requires_grad_(True)
    lk, _, _ = lk_step_loss(draft_lk, target, t2d, mask, eta=0.0)
    kl, _, _ = eagle3_step_loss(draft_kl, target, t2d, mask)
    lk.backward()
    kl.backward()
    torch.testing.assert_close(draft_lk.grad, draft_kl.grad)
    p_tilde, argmax = draft_vocab_targets(target, t2d)
    entropy = -(p_tilde * p_tilde.log()).sum(-1)
    in_vocab = mask.bool() & (argmax >= 0)
    assert lk.item() == pytest.approx(kl.item() - (entropy * in_vocab).sum().item() / 4, rel=1e-5)


@pytest.mark.parametrize("draft_row", [[-3.0, 2.0, 2.0], [3.0, 0.0, 0.0]], ids=["far-off", "close"])
def test_lk_gradient_raises_the_drafts_probability_of_the_targets_argmax(draft_row):
    """Far off (α ≈ 0.02, λ ≈ 0.95: mostly KL) and close (α ≈ 0.92, λ ≈ 0.06: mostly TV), one
    gradient step raises q(target argmax)."""
    t2d = torch.ones(3, dtype=torch.bool)
    target = torch.tensor([[5.0, 0.0, 0.0]])  # p ≈ [0.987, 0.007, 0.007]
    draft = torch.tensor([draft_row], requires_grad=True)
    before = torch.softmax(draft.detach(), -1)[0, 0].item()
    assert before < torch.softmax(target, -1)[0, 0].item()  # q(argmax) below p(argmax): room to rise
    loss, _, _ = lk_step_loss(draft, target, t2d, torch.ones(1))
    loss.backward()
    assert draft.grad[0, 0] < 0  # descent raises the argmax's logit
    after = torch.softmax(draft.detach() - 0.1 * draft.grad, -1)[0, 0].item()
    assert after > before


def test_lk_loss_num_items_semantics_match_the_kl_losss():
    """Divided by num_items instead of the batch's count, and additive over a split batch: as loss=kl."""
    torch.manual_seed(1)
    target, t2d = torch.randn(2, 4, 6), torch.ones(6, dtype=torch.bool)
    draft = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1]])
    for step in (lk_step_loss, eagle3_step_loss):
        mean, _, count = step(draft, target, t2d, mask)
        summed, _, _ = step(draft, target, t2d, mask, num_items=1)
        assert int(count) == 5 and summed.item() == pytest.approx(5 * mean.item(), rel=1e-6)
        halves = [step(draft[i], target[i], t2d, mask[i], num_items=5)[0] for i in range(2)]
        assert sum(halves).item() == pytest.approx(mean.item(), rel=1e-6)  # two micro-batches = one batch
