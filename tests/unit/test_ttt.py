"""Training-time test: the batched unroll equals running the K steps one query at a time through
the draft's own KV-cache path, row by row, the way decoding would see them."""

from types import SimpleNamespace

import pytest
import torch
from test_losses import eagle3_step_loss, lk_step_loss
from tiny_targets import draft_features, target_outputs, tiny_draft, tiny_target

from baldeagle.model.layers import DraftCache
from baldeagle.train.losses import eagle1_loss
from baldeagle.train.ttt import (
    StepRows, eagle1_forward, needed_rows, real_and_positions, scored_positions, shift_left, ttt_forward, ttt_loss,
    ttt_unroll,
)


def unroll(draft, input_ids, features, target_logits, loss_mask, steps, attention_mask=None, position_ids=None,
           impl="sdpa", num_items=None, all_rows=False):
    """`ttt_forward`'s steps, seen from outside: its TTTOutput fields plus every step's outputs
    scattered back to [B, T, H] (`hidden`, 0 where the step did not run) and the rows it ran on
    (`ran`, [B, T] bool). all_rows: run every row at every step (the plain unroll)."""
    real, position_ids = real_and_positions(input_ids, attention_mask, position_ids)
    trained = scored_positions(loss_mask, real)
    runs = [StepRows.where(torch.ones_like(real))] * steps if all_rows else needed_rows(trained, real, steps)
    outputs = ttt_unroll(draft, input_ids, features, runs, real, position_ids, impl)
    out = ttt_loss(draft, outputs, runs, trained, real, target_logits, num_items=num_items)
    hidden, ran = [], []
    for rows, step in zip(runs, outputs):
        b_valid = torch.arange(real.shape[0])[:, None].expand_as(rows.index)[rows.valid]
        full = step.new_zeros(*real.shape, step.shape[-1])
        hidden.append(full.index_put((b_valid, rows.index[rows.valid]), step[rows.valid]))
        ran.append(torch.zeros_like(real).scatter(1, rows.index, rows.valid))
    return SimpleNamespace(**vars(out), hidden=hidden, ran=ran)


def stepwise_reference(draft, input_ids, features, target_logits, loss_mask, attention_mask, position_ids, steps,
                       step_loss=eagle3_step_loss):
    """Per step k: outputs [B, T, H] and (loss, correct, count), one cached forward per (row, step).

    Step 0 is ordinary incremental decoding: token x_{t+1}, feature fc(g_t), one row at a time
    with a growing cache. Row t of step k ≥ 1 continues from its own cache, which holds the
    step-0 keys 0..t and its own keys of steps 1..k-1: token x_{t+1+k}, feature = its step-(k-1)
    output, position t+k. Its logits are scored against the target at t+1+k where x_{t+2+k} is trained.
    """
    batch, length = input_ids.shape
    hidden = draft.project(features)
    shared, outputs = DraftCache(), []
    step0 = []
    for t in range(length):  # step 0, one token at a time
        ids_t = input_ids[:, t + 1 : t + 2] if t + 1 < length else torch.zeros(batch, 1, dtype=torch.long)
        step0.append(
            draft(ids_t, hidden[:, t : t + 1], position_ids[:, t : t + 1], shared, attention_mask[:, : t + 1])
        )
    outputs.append(torch.cat(step0, dim=1))
    row_caches = [DraftCache(shared.k[:, :, : t + 1], shared.v[:, :, : t + 1]) for t in range(length)]
    for k in range(1, steps):
        step = []
        for t in range(length):
            nxt = t + 1 + k
            ids_t = input_ids[:, nxt : nxt + 1] if nxt < length else torch.zeros(batch, 1, dtype=torch.long)
            keys_mask = torch.cat([attention_mask[:, : t + 1], torch.ones(batch, k, dtype=torch.long)], dim=1)
            previous = outputs[k - 1][:, t : t + 1]
            step.append(draft(ids_t, previous, position_ids[:, t : t + 1] + k, row_caches[t], keys_mask))
        outputs.append(torch.cat(step, dim=1))

    losses = []
    for k, out in enumerate(outputs):
        rows = [(b, t) for b in range(batch) for t in range(length) if t + 2 + k < length and loss_mask[b, t + 2 + k] and attention_mask[b, t]]
        draft_logits = torch.stack([draft.logits(out[b, t]) for b, t in rows])
        targets = torch.stack([target_logits[b, t + 1 + k] for b, t in rows])
        losses.append(step_loss(draft_logits, targets, draft.t2d, torch.ones(len(rows))))
    return outputs, losses


def _batch(family, padding_side, length=11, real=7, **options):
    """Two rows: one full, one with `length - real` pad tokens on `padding_side` (`options`: EAGLE 3.1)."""
    target = tiny_target(family)
    draft, cfg = tiny_draft(target, "eagle3", draft_vocab_size=128, seed=5, **options)
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, cfg.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    pad = slice(real, None) if padding_side == "right" else slice(0, length - real)
    attention_mask[1, pad] = 0
    ids[1, pad] = 0
    loss_mask = ((torch.arange(length) >= 2) & (torch.arange(length) != 6)).long() * attention_mask  # a prompt, a gap
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden_states, logits = target_outputs(target, ids, attention_mask)
    return draft, ids, draft_features(hidden_states, cfg), logits, loss_mask, attention_mask, position_ids


@pytest.mark.parametrize("all_rows", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_ttt_equals_stepwise_kv_cache_reference(padding_side, impl, all_rows):
    steps = 3
    draft, ids, features, logits, loss_mask, attention_mask, positions = _batch("llama", padding_side)
    out = unroll(draft, ids, features, logits, loss_mask, steps=steps, attention_mask=attention_mask,
                 position_ids=positions, impl=impl, all_rows=all_rows)
    with torch.no_grad():
        ref_hidden, ref_losses = stepwise_reference(
            draft, ids, features, logits, loss_mask, attention_mask, positions, steps
        )
    real = attention_mask.bool()
    for k in range(steps):
        ran = real & out.ran[k]  # every row with all_rows; else the rows a trained loss needs
        assert bool(out.ran[k].all()) if all_rows else 0 < int(ran.sum()) < int(real.sum())
        torch.testing.assert_close(out.hidden[k][ran], ref_hidden[k][ran], atol=1e-5, rtol=1e-5)
        loss, correct, count = ref_losses[k]
        torch.testing.assert_close(out.step_losses[k], loss, atol=1e-5, rtol=1e-5)
        assert (int(out.correct[k]), int(out.count[k])) == (int(correct), int(count))
    assert out.count[0] > out.count[2] > 0  # rows run out as the steps shift
    expected = sum(0.8**k * loss for k, (loss, _, _) in enumerate(ref_losses))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    plain = ttt_forward(draft, ids, features, logits, loss_mask, steps=steps, attention_mask=attention_mask,
                        position_ids=positions, impl=impl)  # the training entry point: the same numbers
    torch.testing.assert_close(plain.step_losses, out.step_losses, atol=1e-5, rtol=1e-5)
    assert [int(c) for c in plain.correct] == [int(c) for c in out.correct]


def test_ttt_with_loss_lk_scores_every_step_with_lk():
    """loss=lk: each step's loss is LK^λ on the stepwise reference's rows, with the target's mass on
    the draft vocabulary (128 of 256 tokens here) in the acceptance rate; correct and count as loss=kl."""
    steps = 3
    draft, ids, features, logits, loss_mask, attention_mask, positions = _batch("llama", "left")
    out = ttt_forward(draft, ids, features, logits, loss_mask, steps=steps, attention_mask=attention_mask,
                      position_ids=positions, loss="lk")
    kl = ttt_forward(draft, ids, features, logits, loss_mask, steps=steps, attention_mask=attention_mask,
                     position_ids=positions)
    with torch.no_grad():
        _, ref_losses = stepwise_reference(draft, ids, features, logits, loss_mask, attention_mask, positions, steps,
                                           step_loss=lk_step_loss)
    for k, (loss, correct, count) in enumerate(ref_losses):
        torch.testing.assert_close(out.step_losses[k], loss, atol=1e-5, rtol=1e-5)
        assert (int(out.correct[k]), int(out.count[k])) == (int(correct), int(count))
        assert (int(kl.correct[k]), int(kl.count[k])) == (int(correct), int(count))
        assert abs(out.step_losses[k].item() - kl.step_losses[k].item()) > 1e-3  # another loss
    out.loss.backward()
    assert draft.midlayer.self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss must be one of kl, lk, got 'ce'"):
        ttt_forward(draft, ids, features, logits, loss_mask, steps=1, loss="ce")


def test_label_temperature_equals_the_target_logits_divided_by_it():
    """label_temperature T reads the target's draft-vocabulary distribution as p^(1/T): the same as
    training against logits / T at T = 1 (a second path), with the same accuracy (the argmax is kept)."""
    steps = 2
    draft, ids, features, logits, loss_mask, attention_mask, positions = _batch("llama", "right")
    kwargs = dict(steps=steps, attention_mask=attention_mask, position_ids=positions)
    sharp = ttt_forward(draft, ids, features, logits, loss_mask, label_temperature=0.5, **kwargs)
    scaled = ttt_forward(draft, ids, features, logits / 0.5, loss_mask, **kwargs)
    plain = ttt_forward(draft, ids, features, logits, loss_mask, **kwargs)
    torch.testing.assert_close(sharp.step_losses, scaled.step_losses, atol=1e-5, rtol=1e-5)
    for k in range(steps):
        assert abs(sharp.step_losses[k].item() - plain.step_losses[k].item()) > 1e-5  # another target (a fresh draft is near uniform)
        assert (int(sharp.correct[k]), int(sharp.count[k])) == (int(plain.correct[k]), int(plain.count[k]))


def test_the_objective_refuses_lk_for_eagle1_and_unknown_losses():
    from baldeagle.train.objective import DraftObjective

    target = tiny_target("llama")
    with pytest.raises(ValueError, match="loss=lk is an EAGLE-3 loss"):
        DraftObjective(tiny_draft(target, "eagle1")[0], loss="lk")
    with pytest.raises(ValueError, match="loss must be one of kl, lk"):
        DraftObjective(tiny_draft(target, "eagle3", draft_vocab_size=128)[0], loss="tv")
    with pytest.raises(ValueError, match="label_temperature is for EAGLE-3 drafts"):
        DraftObjective(tiny_draft(target, "eagle1")[0], label_temperature=0.5)
    with pytest.raises(ValueError, match="label_temperature must be > 0, got 0"):
        DraftObjective(tiny_draft(target, "eagle3", draft_vocab_size=128)[0], label_temperature=0)


EAGLE31 = [dict(feed_normed_hidden=True), dict(norm_before_fc=True, feed_normed_hidden=True),
           dict(fc_norm=True, feed_normed_hidden=True), dict(norm_before_fc=True)]


def randomise_norms(draft):
    """Norms start at 1; make their weights visible (the final norm and EAGLE 3.1's input norms)."""
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            if name.startswith(("norm.", "input_norm.", "fc_norm.")):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return draft


@pytest.mark.parametrize("options", EAGLE31, ids=lambda o: "+".join(o))
def test_ttt_with_eagle31_options_equals_stepwise_kv_cache_reference(options):
    """With the options on, the batched unroll is still the draft's own step-by-step decoding path."""
    steps = 3
    draft, ids, features, logits, loss_mask, attention_mask, positions = _batch("llama", "left", **options)
    randomise_norms(draft)
    out = unroll(draft, ids, features, logits, loss_mask, steps=steps, attention_mask=attention_mask,
                 position_ids=positions)
    with torch.no_grad():
        ref_hidden, ref_losses = stepwise_reference(draft, ids, features, logits, loss_mask, attention_mask,
                                                    positions, steps)
    for k in range(steps):
        ran = attention_mask.bool() & out.ran[k]
        torch.testing.assert_close(out.hidden[k][ran], ref_hidden[k][ran], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.step_losses[k], ref_losses[k][0], atol=1e-5, rtol=1e-5)
        assert (int(out.correct[k]), int(out.count[k])) == (int(ref_losses[k][1]), int(ref_losses[k][2]))


@pytest.mark.parametrize("options", [{}, *EAGLE31], ids=lambda o: "+".join(o) or "eagle3")
def test_ttt_step_k_reads_the_post_norm_state_of_step_k_minus_1(options):
    """By hand: the feature input of step 0 is fc(norm(g)) (the input norm the options ask for), and
    that of step k ≥ 1 is norm(out_{k-1}) with feed_normed_hidden (the draft's final norm, as vLLM's
    norm_output), else out_{k-1} itself; the logits are lm_head(norm(out_k)) either way."""
    draft, ids, features, logits, loss_mask, attention_mask, positions = _batch("qwen3", "right", real=11, **options)
    randomise_norms(draft)
    calls = []  # (feature input, un-normed output) of each run of the decoder layer: one per step
    hook = draft.midlayer.register_forward_hook(lambda module, args, out: calls.append((args[1], out)))
    with torch.no_grad():
        out = unroll(draft, ids, features, logits, loss_mask, steps=3, all_rows=True)  # every row, in order
    hook.remove()
    eps = draft.config.rms_norm_eps

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    g = features
    if options.get("norm_before_fc"):
        g = rms(g, draft.input_norm.weight)
    if options.get("fc_norm"):
        g = torch.cat([rms(part, norm.weight) for part, norm in zip(g.split(64, dim=-1), draft.fc_norm)], dim=-1)
    assert len(calls) == 3
    torch.testing.assert_close(calls[0][0], g @ draft.fc.weight.T, atol=1e-5, rtol=1e-5)
    states = []  # by hand: the state each step hands on
    for k, (_, raw) in enumerate(calls):
        states.append(rms(raw, draft.norm.weight) if options.get("feed_normed_hidden") else raw)
        torch.testing.assert_close(out.hidden[k], states[k], atol=1e-5, rtol=1e-5)  # what the unroll returns
        if k > 0:  # step k's feature input is step k-1's state
            torch.testing.assert_close(calls[k][0], states[k - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(draft.logits(out.hidden[k]), draft.lm_head(rms(raw, draft.norm.weight)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("all_rows", [False, True])
def test_ttt_queries_never_see_later_rows(all_rows):
    """Changing the features after row 5 leaves every step's rows 0..5 as they were."""
    draft, ids, features, logits, loss_mask, _, _ = _batch("qwen3", "right", real=11)
    with torch.no_grad():
        base = unroll(draft, ids, features, logits, loss_mask, steps=3, all_rows=all_rows)
        changed = features.clone()
        changed[:, 6:] += 1.0  # features after row 5 only
        moved = unroll(draft, ids, changed, logits, loss_mask, steps=3, all_rows=all_rows)
    for k in range(3):
        torch.testing.assert_close(moved.hidden[k][:, :6], base.hidden[k][:, :6])
        assert not torch.allclose(moved.hidden[k][:, 6:], base.hidden[k][:, 6:])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_ttt_on_needed_rows_equals_every_row(impl):
    """Running each step only on the rows a trained loss needs gives the plain unroll's losses,
    metrics and gradients: left and right padding, a patchy loss mask, a row with nothing trained."""
    target = tiny_target("llama")
    draft, cfg = tiny_draft(target, "eagle3", draft_vocab_size=128, seed=11)
    generator = torch.Generator().manual_seed(12)
    length = 23
    ids = torch.randint(3, cfg.vocab_size, (4, length), generator=generator)
    attention_mask = torch.ones(4, length, dtype=torch.long)
    attention_mask[1, 17:] = 0  # right padding
    attention_mask[2, :5] = 0  # left padding
    ids[attention_mask == 0] = 0
    loss_mask = (torch.rand(4, length, generator=generator) < 0.4).long()  # patchy
    loss_mask[1, 17:] = 1  # careless masks on padding: the padding rows must still not count
    loss_mask[2, :5] = 1
    loss_mask[3] = 0  # nothing trained: this row runs no step
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden_states, logits = target_outputs(target, ids, attention_mask)
    features = draft_features(hidden_states, cfg)

    results = {}
    for all_rows in (True, False):
        draft.zero_grad()
        out = unroll(draft, ids, features, logits, loss_mask, steps=4, attention_mask=attention_mask,
                     position_ids=position_ids, impl=impl, num_items=None, all_rows=all_rows)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in draft.trainable_parameters().items()}
        results[all_rows] = out, grads
    (dense, dense_grads), (sparse, sparse_grads) = results[True], results[False]
    torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=1e-5)
    for k in range(4):
        torch.testing.assert_close(sparse.step_losses[k], dense.step_losses[k], atol=1e-6, rtol=1e-5)
        assert int(sparse.correct[k]) == int(dense.correct[k]) and int(sparse.count[k]) == int(dense.count[k])
        assert not sparse.ran[k][3].any()
    assert sparse.count[3] > 0 and sum(int(r.sum()) for r in sparse.ran) < 0.6 * sum(int(r.sum()) for r in dense.ran)
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(sparse_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_shift_left():
    x = torch.tensor([[1, 2, 3, 4]])
    assert shift_left(x, 1).tolist() == [[2, 3, 4, 0]]
    assert shift_left(x, 3).tolist() == [[4, 0, 0, 0]]


def test_eagle1_step_alignment_by_hand():
    """Row t reads (x_{t+1}, f_t), is compared with f_{t+1} and the target at t+1, where x_{t+2} is trained."""
    target = tiny_target("qwen2")
    draft, cfg = tiny_draft(target, "eagle1", seed=4)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    hidden_states, logits = target_outputs(target, ids)
    features = hidden_states[-1]
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 1, 1]])
    loss, metrics = eagle1_forward(draft, ids, features, loss_mask, logits)
    with torch.no_grad():
        out = draft(ids[:, 1:], features[:, :-1], torch.arange(8)[None])  # rows 0..7
    rows = [t for t in range(7) if loss_mask[0, t + 2]]
    pred = out[0, rows]
    expected, by_hand = eagle1_loss(pred, features[0, [t + 1 for t in rows]], draft.logits(pred),
                                    logits[0, [t + 1 for t in rows]], torch.ones(len(rows)))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert int(metrics["count"]) == len(rows) == 5 and int(metrics["correct"]) == int(by_hand["correct"])
    # without target logits, the frozen LM head on f_{t+1} gives the same target distribution
    torch.testing.assert_close(eagle1_forward(draft, ids, features, loss_mask)[0], loss, atol=1e-5, rtol=1e-5)


def test_eagle1_left_padding_changes_nothing():
    target = tiny_target("llama")
    draft, _ = tiny_draft(target, "eagle1", seed=6)
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(8))
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1]])
    features = target_outputs(target, ids)[0][-1]
    plain, plain_metrics = eagle1_forward(draft, ids, features, loss_mask)
    pad = 3
    padded_ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    attention_mask = torch.tensor([[0] * pad + [1] * 8])
    padded_features = torch.cat([torch.randn(1, pad, 64), features], dim=1)
    padded_mask = torch.cat([torch.ones(1, pad, dtype=torch.long), loss_mask], dim=1)  # even a careless mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    padded, padded_metrics = eagle1_forward(draft, padded_ids, padded_features, padded_mask,
                                            attention_mask=attention_mask, position_ids=positions)
    # the pad rows predict tokens 0..1 of the real sequence; with a careless loss mask they would count
    assert int(padded_metrics["count"]) == int(plain_metrics["count"])
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_the_objective_weighs_ttt_step_k_by_weight_to_the_k(weight):
    from baldeagle.data.features import TargetFeatures
    from baldeagle.train.objective import DraftObjective

    target = tiny_target("llama")
    draft, cfg = tiny_draft(target, "eagle3", draft_vocab_size=128, seed=3)
    ids = torch.randint(3, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(4))
    attention_mask = torch.ones_like(ids)
    hidden_states, logits = target_outputs(target, ids, attention_mask)
    batch = {"input_ids": ids, "attention_mask": attention_mask, "loss_mask": torch.ones_like(ids)}
    loss, sums = DraftObjective(draft, ttt_steps=3, ttt_step_weight=weight)(
        batch, TargetFeatures(draft_features(hidden_states, cfg), hidden_states[-1], logits))
    # Every step's sum is divided by the batch's trained tokens (`items`), so each token weighs the same.
    step_means = [sums[f"loss_{k}"] / sums["items"] for k in range(3)]
    assert abs(step_means[1] - step_means[0]) > 1e-3  # the weights are visible in the total
    torch.testing.assert_close(loss, sum(weight**k * m for k, m in enumerate(step_means)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums["loss"], loss * sums["items"])
