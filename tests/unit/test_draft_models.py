"""Draft configs follow their targets; the drafts run, cache correctly, and train only what they should."""

import json
import re

import pytest
import torch
from tiny_targets import TINY_TARGETS, draft_features, target_outputs, tiny_draft, tiny_target

from baldeagle.model import draft_config as dc
from baldeagle.model.eagle3 import Eagle3Draft
from baldeagle.model.layers import DraftCache
from baldeagle.train.ttt import eagle1_forward, ttt_forward

FAMILIES = list(TINY_TARGETS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("draft_type", ["eagle1", "eagle3"])
def test_draft_config_follows_target(family, draft_type):
    target = tiny_target(family)
    t = target.config
    cfg = dc.draft_config_from_target(t, draft_type, draft_vocab_size=100)
    assert cfg.hidden_size == 64 and cfg.intermediate_size == 128
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.head_dim == (24 if family in ("qwen3", "qwen3_moe") else 16)
    assert cfg.rope_parameters == t.rope_parameters and cfg.rope_parameters["rope_theta"] != 10000.0
    if family == "qwen2":
        assert cfg.rope_parameters["rope_type"] == "linear" and cfg.rope_parameters["factor"] == 2.0
    assert cfg.rms_norm_eps == t.rms_norm_eps
    assert cfg.max_position_embeddings == 4096
    assert cfg.attention_bias is (family in ("qwen2", "qwen2_moe"))
    assert cfg.vocab_size == 256 and cfg.target_num_layers == 6
    assert cfg.target_architecture == type(target).__name__
    if draft_type == "eagle3":
        assert cfg.draft_vocab_size == 100 and cfg.aux_layer_ids == [1, 3, 5]
    else:
        assert cfg.draft_vocab_size == 256 and cfg.aux_layer_ids == [6]
    llama = dc.to_llama_config(cfg)
    assert llama.num_hidden_layers == 1 and llama.head_dim == cfg.head_dim
    assert llama.rope_parameters == cfg.rope_parameters and llama.attention_bias == cfg.attention_bias


def test_draft_vocab_is_capped_by_the_target_vocab():
    cfg = dc.draft_config_from_target(tiny_target("llama").config, "eagle3", draft_vocab_size=32000)
    assert cfg.draft_vocab_size == 256


@pytest.mark.parametrize("bad", [[2, 3, 7], [-1, 2, 3]])
def test_aux_layer_id_out_of_range_names_the_id(bad):
    config = tiny_target("llama").config
    wrong = [i for i in bad if not 0 <= i <= 6][0]
    with pytest.raises(ValueError, match=rf"aux layer id {wrong} .*L=6"):
        dc.draft_config_from_target(config, "eagle3", aux_layer_ids=bad)


def test_config_save_load_round_trip_and_errors(tmp_path):
    cfg = dc.draft_config_from_target(tiny_target("qwen2").config, "eagle3", draft_vocab_size=64)
    path = dc.save(cfg, tmp_path)
    assert dc.load(tmp_path) == cfg
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(ValueError, match="surprise"):
        dc.load(tmp_path)
    del data["hidden_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hidden_size"):
        dc.load(tmp_path)


def _inputs(target, cfg, batch=2, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (batch, length), generator=generator)
    hidden_states, logits = target_outputs(target, ids)
    positions = torch.arange(length).expand(batch, length)
    return ids, draft_features(hidden_states, cfg), logits, positions


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("draft_type", ["eagle1", "eagle3"])
def test_forward_with_cache_equals_full_sequence(family, draft_type):
    target = tiny_target(family)
    draft, cfg = tiny_draft(target, draft_type)
    ids, features, _, positions = _inputs(target, cfg)
    with torch.no_grad():
        hidden = draft.project(features)
        full = draft(ids, hidden, positions)  # [B, T, H]
        cache, pieces = DraftCache(), []
        for start, stop in [(0, 5), (5, 6), (6, 9), (9, 12)]:  # a prefill, then single and multi-token chunks
            s = slice(start, stop)
            pieces.append(draft(ids[:, s], hidden[:, s], positions[:, s], cache=cache))
        logits = draft.logits(full)
    assert len(cache) == 12 and cache.k.shape == (2, 2, 12, cfg.head_dim)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert logits.shape == (2, 12, cfg.draft_vocab_size)
    target_ids = draft.to_target_ids(logits.argmax(-1))
    if draft_type == "eagle3":
        assert draft.t2d[target_ids].all()


def test_cache_crop_and_select_match_a_fresh_cache():
    target = tiny_target("llama")
    draft, cfg = tiny_draft(target, "eagle3")
    ids, features, _, positions = _inputs(target, cfg, batch=1, length=8)
    with torch.no_grad():
        hidden = draft.project(features)
        cache = DraftCache()
        draft(ids, hidden, positions, cache=cache)
        cache.crop(5)
        after_crop = draft(ids[:, 5:6], hidden[:, 5:6], positions[:, 5:6], cache=cache)
        fresh = draft(ids[:, :6], hidden[:, :6], positions[:, :6])[:, 5:6]
        torch.testing.assert_close(after_crop, fresh, atol=1e-5, rtol=1e-5)
        k_before = cache.k.clone()
        cache.select(torch.tensor([0, 2, 5]))
        torch.testing.assert_close(cache.k, k_before[:, :, [0, 2, 5]])
        cache.k, cache.v = k_before, k_before.clone()
        cache.select(torch.tensor([[1, 3]]))
        torch.testing.assert_close(cache.k, k_before[:, :, [1, 3]])


def test_padding_and_tree_masks():
    """Left padding with a [B, S] mask equals the unpadded row; a 4D mask is used as given."""
    target = tiny_target("mistral")
    draft, cfg = tiny_draft(target, "eagle1")
    ids, features, _, positions = _inputs(target, cfg, batch=1, length=6)
    with torch.no_grad():
        plain = draft(ids, features, positions)
        pad = 3
        padded_ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
        padded_features = torch.cat([torch.randn(1, pad, 64), features], dim=1)
        padded_positions = torch.cat([torch.zeros(1, pad, dtype=torch.long), positions], dim=1)
        mask = torch.tensor([[0] * pad + [1] * 6])
        padded = draft(padded_ids, padded_features, padded_positions, attention_mask=mask)
        torch.testing.assert_close(padded[:, pad:], plain, atol=1e-5, rtol=1e-5)
        # a tree: nodes 0-1-2 on one branch, 3 a sibling of 1 (sees 0 and itself only)
        tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)[None, None]
        out = draft(ids[:, :4], features[:, :4], torch.tensor([[0, 1, 2, 1]]), attention_mask=tree)
        sibling = draft(ids[:, [0, 3]], features[:, [0, 3]], torch.tensor([[0, 1]]))
        torch.testing.assert_close(out[:, [0, 3]], sibling, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :3], plain[:, :3], atol=1e-5, rtol=1e-5)


def test_from_target_copies_embeddings_and_head():
    target = tiny_target("llama")
    draft3, cfg = tiny_draft(target, "eagle3")
    used = torch.arange(cfg.draft_vocab_size) + draft3.d2t
    torch.testing.assert_close(draft3.embed_tokens.weight, target.model.embed_tokens.weight)
    torch.testing.assert_close(draft3.lm_head.weight, target.lm_head.weight[used])
    assert draft3.t2d.sum() == cfg.draft_vocab_size and draft3.t2d[used].all()
    draft1, _ = tiny_draft(target, "eagle1")
    torch.testing.assert_close(draft1.lm_head.weight, target.lm_head.weight)
    with pytest.raises(ValueError, match="d2t"):
        Eagle3Draft.from_target(target, cfg)


def test_state_dict_names_are_the_serving_names():
    target = tiny_target("qwen2")  # attention_bias: q/k/v/o biases
    draft3, _ = tiny_draft(target, "eagle3")
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    mid = [f"midlayer.self_attn.{p}.{w}" for p in attn for w in ("weight", "bias")]
    mid += [f"midlayer.{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")]
    mid += [f"midlayer.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    top = {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
    assert set(draft3.state_dict()) == top | set(mid)
    assert draft3.fc.weight.shape == (64, 192) and draft3.midlayer.self_attn.q_proj.weight.shape == (64, 128)
    draft1, _ = tiny_draft(tiny_target("llama"), "eagle1")
    layer = [f"layers.0.self_attn.{p}.weight" for p in attn] + ["layers.0.post_attention_layernorm.weight"]
    layer += [f"layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    assert set(draft1.state_dict()) == {"embed_tokens.weight", "lm_head.weight", "fc.weight", "fc.bias", *layer}


def _check_grads(draft, frozen):
    trainable = draft.trainable_parameters()
    assert set(trainable) == {n for n, p in draft.named_parameters() if p.requires_grad}
    for name, param in draft.named_parameters():
        if name.split(".")[0] in frozen:
            assert name not in trainable and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradients_reach_every_trainable_parameter(family):
    target = tiny_target(family)
    draft1, cfg1 = tiny_draft(target, "eagle1", seed=2)
    ids, _, logits, _ = _inputs(target, cfg1, length=10)
    hidden_states, _ = target_outputs(target, ids)
    mask = torch.ones_like(ids)
    loss, _ = eagle1_forward(draft1, ids, draft_features(hidden_states, cfg1), mask, logits, noise_std=0.2)
    loss.backward()
    _check_grads(draft1, frozen={"embed_tokens", "lm_head"})

    draft3, cfg3 = tiny_draft(target, "eagle3", seed=3)
    out = ttt_forward(draft3, ids, draft_features(hidden_states, cfg3), logits, mask, steps=2)
    out.loss.backward()
    _check_grads(draft3, frozen={"embed_tokens"})
    assert "lm_head.weight" in draft3.trainable_parameters()


# ---------------------------------------------------------------------------------------------
# EAGLE 3.1 options: norm before fc (over 3H, or per aux layer) and the post-norm state fed back
# ---------------------------------------------------------------------------------------------

EAGLE31 = {"norm_before_fc": dict(norm_before_fc=True), "fc_norm": dict(fc_norm=True),
           "feed_normed_hidden": dict(feed_normed_hidden=True)}


def rms_norm(x, weight, eps):
    """RMSNorm by hand: x / sqrt(mean(x²) + eps) · weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _option_draft(target, base, **options):
    """A draft with `options` on and `base`'s weights; its own norms' weights randomised."""
    draft, cfg = tiny_draft(target, "eagle3", **options)
    missing, unexpected = draft.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(name.startswith(("input_norm.", "fc_norm.")) for name in missing)
    with torch.no_grad():
        for name in missing:
            draft.get_parameter(name).add_(0.3 * torch.randn(draft.get_parameter(name).shape))
    return draft, cfg


def _two_steps(draft, ids, features, positions):
    """Logits of step 0 and of step 1 (which reads step 0's state, the tokens shifted by one)."""
    with torch.no_grad():
        state0 = draft(ids, draft.project(features), positions)
        state1 = draft(ids.roll(-1, dims=1), state0, positions + 1)
        return draft.logits(state0), draft.logits(state1)


def test_eagle31_options_off_are_the_eagle3_formula_and_on_change_the_logits():
    target = tiny_target("llama")
    base, cfg = tiny_draft(target, "eagle3", seed=4)
    with torch.no_grad():
        base.norm.weight.add_(0.3 * torch.randn(64))
    ids, features, _, positions = _inputs(target, cfg)
    eps, mid = cfg.rms_norm_eps, base.midlayer
    with torch.no_grad():  # EAGLE-3 by hand: lm_head(norm(out)), out (un-normed) fed to the next step
        rope = base.rope(features, positions)
        out0 = mid(base.embed_tokens(ids), features @ base.fc.weight.T, rope)
        out1 = mid(base.embed_tokens(ids.roll(-1, dims=1)), out0, base.rope(features, positions + 1))
        by_hand = [base.lm_head(rms_norm(out, base.norm.weight, eps)) for out in (out0, out1)]
    off = _two_steps(base, ids, features, positions)
    for got, expected in zip(off, by_hand):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name, options in EAGLE31.items():
        draft, _ = _option_draft(target, base, **options)
        step0, step1 = _two_steps(draft, ids, features, positions)
        assert not torch.allclose(step1, off[1], atol=1e-3), name  # every option changes the chain
        # feeding the post-norm state back changes only the later steps: step 0 reads fc(g) either way
        assert torch.allclose(step0, off[0], atol=1e-5) == (name == "feed_normed_hidden"), name


def test_eagle31_norms_by_hand_and_their_weights_are_the_engines_names():
    target = tiny_target("llama")
    base, cfg = tiny_draft(target, "eagle3", seed=4)
    ids, features, _, positions = _inputs(target, cfg)
    eps = cfg.rms_norm_eps
    concat, _ = _option_draft(target, base, norm_before_fc=True)
    per_layer, _ = _option_draft(target, base, fc_norm=True)
    fed_back, _ = _option_draft(target, base, feed_normed_hidden=True)
    with torch.no_grad():
        torch.testing.assert_close(concat.project(features),
                                   rms_norm(features, concat.input_norm.weight, eps) @ base.fc.weight.T)
        parts = [rms_norm(part, norm.weight, eps) for part, norm in zip(features.split(64, dim=-1), per_layer.fc_norm)]
        torch.testing.assert_close(per_layer.project(features), torch.cat(parts, dim=-1) @ base.fc.weight.T)
        out = base(ids, base.project(features), positions)  # the un-normed output
        state = fed_back(ids, fed_back.project(features), positions)
        torch.testing.assert_close(state, rms_norm(out, base.norm.weight, eps))  # the state it carries
        torch.testing.assert_close(fed_back.logits(state), base.logits(out))  # logits read the state once normed
    names = set(base.state_dict())
    assert set(concat.state_dict()) - names == {"input_norm.weight"} and concat.input_norm.weight.shape == (192,)
    assert set(per_layer.state_dict()) - names == {"fc_norm.0.weight", "fc_norm.1.weight", "fc_norm.2.weight"}
    assert set(fed_back.state_dict()) == names


def test_eagle31_norm_weights_train():
    target = tiny_target("llama")
    ids, _, logits, _ = _inputs(target, tiny_draft(target)[1], length=10)
    hidden_states, _ = target_outputs(target, ids)
    for options in (dict(norm_before_fc=True, feed_normed_hidden=True), dict(fc_norm=True, feed_normed_hidden=True)):
        draft, cfg = tiny_draft(target, "eagle3", seed=3, **options)
        features = draft_features(hidden_states, cfg)
        ttt_forward(draft, ids, features, logits, torch.ones_like(ids), steps=2).loss.backward()
        _check_grads(draft, frozen={"embed_tokens"})
        assert {"input_norm.weight", "fc_norm.0.weight"} & set(draft.trainable_parameters())


def test_an_older_draft_config_without_the_options_loads_with_the_old_behaviour(tmp_path):
    from baldeagle.model.checkpoint import load_draft, save_draft

    target = tiny_target("llama")
    draft, cfg = tiny_draft(target, "eagle3", seed=4)
    save_draft(draft, tmp_path)
    path = tmp_path / dc.CONFIG_NAME
    data = json.loads(path.read_text())
    assert {name: data.pop(name) for name in dc.NORM_OPTIONS} == dict.fromkeys(dc.NORM_OPTIONS, False)
    path.write_text(json.dumps(data))  # what BaldEagle wrote before the options existed
    loaded = load_draft(tmp_path)
    assert loaded.config == cfg and not any(getattr(loaded.config, name) for name in dc.NORM_OPTIONS)
    ids, features, _, positions = _inputs(target, cfg)
    for got, expected in zip(_two_steps(loaded, ids, features, positions), _two_steps(draft, ids, features, positions)):
        assert torch.equal(got, expected)
    on = dc.draft_config_from_target(target.config, "eagle3", fc_norm=True, feed_normed_hidden=True)
    dc.save(on, tmp_path / "on")
    assert dc.load(tmp_path / "on") == on and on.fc_norm and on.feed_normed_hidden and not on.norm_before_fc


@pytest.mark.parametrize("option", dc.NORM_OPTIONS)
def test_eagle1_refuses_the_eagle31_options(option, tmp_path):
    config = tiny_target("llama").config
    with pytest.raises(ValueError, match=f"draft_type=eagle1 does not support {option}"):
        dc.draft_config_from_target(config, "eagle1", **{option: True})
    path = dc.save(dc.draft_config_from_target(config, "eagle1"), tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), option: True}))
    with pytest.raises(ValueError, match=f"{dc.CONFIG_NAME}: draft_type=eagle1 does not support {option}"):
        dc.load(tmp_path)


def test_the_two_input_norms_exclude_each_other():
    with pytest.raises(ValueError, match="norm_before_fc and fc_norm exclude each other"):
        dc.draft_config_from_target(tiny_target("llama").config, "eagle3", norm_before_fc=True, fc_norm=True)
    with pytest.raises(TypeError, match="norm_outptu"):
        dc.draft_config_from_target(tiny_target("llama").config, "eagle3", norm_outptu=True)


# ----------------------------------------------------------------------------------------------
# init_from_target_layer: the draft's decoder layer starts from one of the target's
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_eagle3_layer_from_a_target_layer_computes_that_layer_on_the_feature(family):
    """q/k/v's embedding half is zero and hidden_norm is the target's input norm, so the new
    midlayer is the target's layer 3 applied to the feature, whatever the embedding."""
    target = tiny_target(family)
    draft, _ = tiny_draft(target, "eagle3", init_layer=3)
    layer, mid = target.model.layers[3], draft.midlayer
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = getattr(mid.self_attn, name).weight
        assert torch.equal(weight[:, :64], torch.zeros_like(weight[:, :64]))
        assert torch.equal(weight[:, 64:], getattr(layer.self_attn, name).weight)
        if family == "qwen2":  # q/k/v biased in the target: copied
            assert torch.equal(getattr(mid.self_attn, name).bias, getattr(layer.self_attn, name).bias)
    if family == "qwen2":  # the draft's o_proj bias (Llama's attention_bias) has no counterpart: zero
        assert torch.equal(mid.self_attn.o_proj.bias, torch.zeros(64))
    assert torch.equal(mid.hidden_norm.weight, layer.input_layernorm.weight)
    assert torch.equal(mid.input_layernorm.weight, torch.ones(64))  # the embedding's norm: as built
    generator = torch.Generator().manual_seed(0)
    feature, embeds = torch.randn(2, 9, 64, generator=generator), torch.randn(2, 9, 64, generator=generator)
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        out = mid(embeds, feature, draft.rope(feature, positions))
        ref = layer(feature, position_embeddings=target.model.rotary_emb(feature, positions), position_ids=positions)
    torch.testing.assert_close(out, ref[0] if isinstance(ref, tuple) else ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_eagle1_layer_from_a_target_layer_copies_its_weights(family):
    target = tiny_target(family)
    draft, _ = tiny_draft(target, "eagle1", init_layer=5)
    mine, theirs = draft.layers[0].state_dict(), target.model.layers[5].state_dict()
    for name, value in mine.items():
        if name == "self_attn.o_proj.bias":
            assert torch.equal(value, torch.zeros(64))  # qwen2: o_proj has no bias in the target
        else:
            assert torch.equal(value, theirs[name]), name
    assert set(theirs) - set(mine) == {"input_layernorm.weight"}  # the EAGLE-1 layer has no input norm


@pytest.mark.parametrize("draft_type", ["eagle1", "eagle3"])
@pytest.mark.parametrize("family, weight", [("qwen3", "self_attn.q_norm.weight [24]"),
                                            ("qwen3_moe", "self_attn.q_norm.weight [24]"),
                                            ("qwen2_moe", "mlp.gate.weight [4, 64]")])
def test_a_target_layer_with_weights_the_draft_lacks_is_refused_naming_them(draft_type, family, weight):
    with pytest.raises(ValueError, match=r"init_from_target_layer=2: the target's decoder layer 2 does not fit the "
                                         rf"draft's layer: {re.escape(weight)} has no counterpart"):
        tiny_draft(tiny_target(family), draft_type, init_layer=2)


def test_a_target_layer_of_other_shapes_or_index_is_refused():
    from baldeagle.model.eagle1 import Eagle1Draft

    target = tiny_target("llama")
    cfg = dc.draft_config_from_target(target.config, "eagle1")
    narrow = dc.DraftConfig(**{**vars(cfg), "intermediate_size": 96})
    with pytest.raises(ValueError, match=r"layer 1 does not fit .*mlp.gate_proj.weight is \[128, 64\], the draft's "
                                         r"is \[96, 64\]"):
        Eagle1Draft.from_target(target, narrow, init_layer=1)
    unbiased = dc.DraftConfig(**{**vars(dc.draft_config_from_target(tiny_target("qwen2").config, "eagle1")),
                                 "attention_bias": False})
    with pytest.raises(ValueError, match=r"self_attn.q_proj.bias \[64\] has no counterpart in the draft's layer"):
        Eagle1Draft.from_target(tiny_target("qwen2"), unbiased, init_layer=0)
    with pytest.raises(ValueError, match=r"init_from_target_layer=6: the target has 6 decoder layers \(0..5\)"):
        Eagle1Draft.from_target(target, cfg, init_layer=6)
