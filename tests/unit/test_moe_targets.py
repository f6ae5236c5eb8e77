"""Mixture-of-experts targets (Qwen3-MoE, Qwen2-MoE): the draft config follows the text config, and
the draft learns from the target's hidden states online and from the offline store, never from
its router outputs."""

import json

import datasets
import pytest
import torch
from safetensors import safe_open
from tiny_targets import MOE_TARGETS, tiny_target
from train_fixtures import save_prepared, save_tiny_target
from transformers import AutoConfig, Qwen3VLMoeConfig

from baldeagle.config import FeaturesConfig, TrainConfig
from baldeagle.conventions import (
    check_full_attention,
    default_aux_layers,
    text_config,
    unsupported_attention,
)
from baldeagle.data.features import OnlineFeatures
from baldeagle.data.store import run_features
from baldeagle.data.store_reader import FeatureStore
from baldeagle.model.checkpoint import load_draft
from baldeagle.model.draft_config import draft_config_from_target
from baldeagle.targets import load_target
from baldeagle.train.run import run_train

# config.json of the released checkpoints, as the hub serves them (the keys that matter here):
# each ships sliding-window keys with the window turned off.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-06, "attention_bias": False, "sliding_window": None,
    "use_sliding_window": False, "max_window_layers": 48, "output_router_logits": False, "vocab_size": 151936,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
}
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
    "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_experts": 60, "num_experts_per_tok": 4, "decoder_sparse_step": 1, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 8192,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "sliding_window": 32768, "use_sliding_window": False,
    "max_window_layers": 21, "vocab_size": 151936, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def released_config(tmp_path, values):
    (tmp_path / "config.json").write_text(json.dumps(values))
    return AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("values, bias", [(QWEN3_30B_A3B, False), (QWEN15_MOE_A27B, True)])
def test_draft_config_of_a_released_moe_config(tmp_path, values, bias):
    """The draft's dense MLP takes the target's dense `intermediate_size`, not one expert's
    `moe_intermediate_size`; the sliding-window keys, off, are no reason to refuse the target."""
    config = released_config(tmp_path, values)
    check_full_attention(config, "the target")  # no error
    assert unsupported_attention(config) == {}
    cfg = draft_config_from_target(config, "eagle3", draft_vocab_size=32000)
    assert cfg.intermediate_size == values["intermediate_size"] != values["moe_intermediate_size"]
    assert cfg.hidden_size == 2048 and cfg.num_key_value_heads == values["num_key_value_heads"]
    assert cfg.head_dim == values.get("head_dim", 128)
    assert cfg.max_position_embeddings == values["max_position_embeddings"]
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1000000.0}
    assert cfg.aux_layer_ids == default_aux_layers(values["num_hidden_layers"])
    assert cfg.attention_bias is bias  # Qwen2-MoE's q/k/v bias
    assert cfg.target_architecture == values["architectures"][0]


def test_qwen2_moe_without_qkv_bias_gives_a_draft_without_bias():
    target = tiny_target("qwen2_moe", qkv_bias=False)
    assert draft_config_from_target(target.config, "eagle3").attention_bias is False
    assert draft_config_from_target(tiny_target("qwen2_moe").config, "eagle3").attention_bias is True


def test_a_moe_text_config_nested_in_a_multimodal_config_is_followed():
    """Qwen3-VL-MoE holds its Qwen3-MoE-style text model's config inside: the draft follows that one."""
    config = Qwen3VLMoeConfig(text_config=dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=256,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 2e5}))
    assert text_config(config).model_type == "qwen3_vl_moe_text"
    assert text_config(config.to_dict())["moe_intermediate_size"] == 32  # a config.json read as a dict
    assert unsupported_attention(config) == {}
    cfg = draft_config_from_target(config, "eagle3", draft_vocab_size=64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.target_num_layers) == (64, 128, 24, 6)
    assert cfg.rope_parameters["rope_theta"] == 2e5


@pytest.mark.parametrize("name", MOE_TARGETS)
def test_tiny_moe_targets_route_tokens(name):
    """The fixtures are real MoE targets: every layer sparse, 2 of 4 experts per token, and the
    router's logits exist (the draft must not read them)."""
    target = tiny_target(name)
    assert target.config.decoder_sparse_step == 1 and target.config.mlp_only_layers == []
    out = target(torch.randint(3, 256, (1, 9)), output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == 6 and out.router_logits[0].shape == (9, 4)
    assert len(out.hidden_states) == 7


@pytest.mark.parametrize("name", MOE_TARGETS)
@pytest.mark.parametrize("router_logits", [False, True])
def test_online_features_of_a_moe_target_are_its_hidden_states(name, router_logits):
    """Even with `output_router_logits` on in the target's config (as trained MoE checkpoints may
    ship it), the features are the aux layers' hidden states and nothing else."""
    target = tiny_target(name, output_router_logits=router_logits)
    ids = torch.randint(3, 256, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    full = target(ids, attention_mask=mask, output_hidden_states=True)
    aux = default_aux_layers(6)
    got = OnlineFeatures(target, "eagle3", aux)({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(got.features, torch.cat([full.hidden_states[i] for i in aux], dim=-1))
    torch.testing.assert_close(got.last_hidden, full.hidden_states[-1])
    assert got.features.shape == (2, 11, 3 * 64)
    b, p = torch.tensor([0, 1, 0]), torch.tensor([2, 6, 10])
    torch.testing.assert_close(got.logits[b, p], full.logits[b, p], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def moe_workspace(tmp_path_factory):
    """A saved Qwen3-MoE target, 16 prepared rows, and the `features` stage's store of them."""
    root = tmp_path_factory.mktemp("moe")
    ws = {"model": str(save_tiny_target(root / "target", "qwen3_moe")),
          "data": str(save_prepared(root / "prepared", rows=16)), "root": root, "store": root / "store"}
    ws["summary"] = run_features(FeaturesConfig(model=ws["model"], data=ws["data"], out=str(ws["store"]),
                                                draft_type="eagle3", max_length=64, batch_tokens=256,
                                                shard_tokens=512))
    return ws


def train_config(ws, out, **changes) -> TrainConfig:
    base = dict(model=ws["model"], data=ws["data"], out=str(ws["root"] / out), ttt_steps=2, draft_vocab_size=128,
                learning_rate=3e-3, warmup_steps=0, max_steps=30, per_device_train_batch_size=4, logging_steps=1,
                save_steps=1000, eval_fraction=0.0, max_length=64, feature_noise=0.0,
                train_sampling_strategy="sequential")
    return TrainConfig(**{**base, **changes})


def losses(out_dir) -> dict[int, float]:
    history = json.loads((out_dir / "final" / "metrics.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_stored_features_of_a_moe_target_are_its_hidden_states(moe_workspace):
    """The `features` stage on a Qwen3-MoE target stores, per row, exactly the hidden states
    entering the aux layers and the final normed state, as an independent forward computes them."""
    ws = moe_workspace
    store = FeatureStore(ws["store"])
    aux = default_aux_layers(6)
    assert store.aux_layer_ids == aux and len(store) == 16
    assert ws["summary"]["bytes_per_token"] == 4 * 64 * 2 + 4  # 3H features + H last hidden (bf16) + int32 id
    target = load_target(ws["model"])
    rows = datasets.load_from_disk(ws["data"])["input_ids"]
    for row in (0, 5, 11):
        ids = torch.tensor(rows[row])[None]
        hidden = target(ids, output_hidden_states=True).hidden_states
        stored = store.row(row)
        assert stored["input_ids"].tolist() == rows[row]
        expected = torch.cat([hidden[i] for i in aux], dim=-1)[0].to(torch.bfloat16)
        torch.testing.assert_close(stored["features"], expected, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(stored["last_hidden"], hidden[-1][0].to(torch.bfloat16), atol=2e-2, rtol=1e-2)
    names = set()
    for shard in ws["store"].glob("shard-*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            names.update(handle.keys())
    assert names == {"features", "last_hidden", "input_ids"}  # no router output stored


def test_a_draft_trains_on_a_moe_target_online_and_offline_alike(moe_workspace):
    """Online (target in the loop) and offline (the store above) training on the Qwen3-MoE target
    give the same first losses, to bf16 precision, and both learn; the draft follows the target's
    text config."""
    ws = moe_workspace
    run_train(train_config(ws, "online"))
    run_train(train_config(ws, "offline", mode="offline", features=str(ws["store"])))
    online, offline = losses(ws["root"] / "online"), losses(ws["root"] / "offline")
    assert sorted(online) == sorted(offline) == list(range(1, 31))
    for step in (1, 2, 3):  # later steps drift apart by the bf16 rounding of the stored features
        assert offline[step] == pytest.approx(online[step], rel=2e-2), (step, online, offline)
    for history in (online, offline):
        assert history[30] < 0.8 * history[1], history
    draft = load_draft(ws["root"] / "online" / "final", expected_type="eagle3")
    assert draft.config.intermediate_size == 128  # the dense width, not moe_intermediate_size (32)
    assert draft.config.head_dim == 24 and draft.config.target_architecture == "Qwen3MoeForCausalLM"
    assert draft.config.rope_parameters["rope_theta"] == 1000000.0
