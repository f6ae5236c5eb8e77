"""Export: each engine's names, shapes and aux-id convention; `--check` catches each contract
violation; exported folders load back with identical logits; refusals."""

import ast
import json
import re
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_targets import draft_features, target_outputs, tiny_target

from baldeagle.export import ExportConfig, export_draft, run_export
from baldeagle.export_load import load_exported
from baldeagle.export_check import check_export
from baldeagle.model.checkpoint import save_draft
from baldeagle.model.draft_config import draft_config_from_target
from baldeagle.model.eagle1 import Eagle1Draft
from baldeagle.model.eagle3 import Eagle3Draft
from baldeagle.model.vocab import build_draft_vocab

AUX = [1, 3, 4]  # not the default of the tiny 6-layer targets ([1, 3, 5]), to catch a silent default
LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]


def make_draft(kind="eagle3", family="llama", aux=AUX, vocab=64, seed=0, **options):
    """A tiny target and a draft for it whose every weight differs from its initial value
    (`options`: EAGLE 3.1 DraftConfig options)."""
    target = tiny_target(family)
    cfg = draft_config_from_target(target.config, kind, draft_vocab_size=vocab,
                                   aux_layer_ids=aux if kind == "eagle3" else None, **options)
    cfg.target_model = f"tiny/{family}"
    torch.manual_seed(seed)
    if kind == "eagle1":
        draft = Eagle1Draft.from_target(target, cfg)
    else:
        d2t, _, _ = build_draft_vocab(torch.randint(0, 50, (cfg.vocab_size,)), cfg.draft_vocab_size)
        draft = Eagle3Draft.from_target(target, cfg, d2t=d2t)
    with torch.no_grad():  # norms start at 1 and biases at 0: make swapped or dropped ones visible
        for param in draft.trainable_parameters().values():
            param.add_(0.1 * torch.randn_like(param))
    return target, draft.eval()


def export(draft, target, path, fmt, **kwargs):
    return export_draft(draft, path, fmt, target_config=target.config, **kwargs)


def draft_logits(draft, target, aux=None, seed=1):
    """The draft's logits for one step on a random prompt (features from the target)."""
    torch.manual_seed(seed)
    ids = torch.randint(3, 256, (2, 11))
    hidden_states, _ = target_outputs(target, ids)
    cfg = draft.config
    features = draft_features(hidden_states, cfg) if cfg.draft_type == "eagle3" else hidden_states[-1]
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        return draft.logits(draft(ids, draft.project(features), positions))


def header(folder):
    return {k: (list(v.shape), v.dtype) for k, v in load_file(str(folder / "model.safetensors")).items()}


def config_of(folder):
    return json.loads((folder / "config.json").read_text())


def rewrite(folder, config=None, drop=(), change=None):
    """Edit an exported folder in place: config updates, dropped tensors, replaced tensors."""
    if config:
        (folder / "config.json").write_text(json.dumps({**config_of(folder), **config}))
    tensors = load_file(str(folder / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if k not in drop}
    tensors.update(change or {})
    save_file(tensors, str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Names, shapes, configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "speculators"])
def test_eagle3_names_shapes_and_aux_convention(tmp_path, fmt):
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "x", fmt)
    prefix = "layers.0." if fmt == "speculators" else "midlayer."
    expected = {
        "fc.weight": [64, 192], "norm.weight": [64], "lm_head.weight": [64, 64], "d2t": [64], "t2d": [256],
        prefix + "self_attn.q_proj.weight": [64, 128], prefix + "self_attn.k_proj.weight": [32, 128],
        prefix + "self_attn.v_proj.weight": [32, 128], prefix + "self_attn.o_proj.weight": [64, 64],
        prefix + "input_layernorm.weight": [64], prefix + "hidden_norm.weight": [64],
        prefix + "post_attention_layernorm.weight": [64], prefix + "mlp.gate_proj.weight": [128, 64],
        prefix + "mlp.up_proj.weight": [128, 64], prefix + "mlp.down_proj.weight": [64, 128],
    }
    found = header(out)
    assert {k: shape for k, (shape, _) in found.items()} == expected  # no embedding by default
    assert found["d2t"][1] == torch.int64 and found["t2d"][1] == torch.bool
    assert found["fc.weight"][1] == torch.float32
    config = config_of(out)
    layer = config["transformer_layer_config"] if fmt == "speculators" else config
    assert layer["num_hidden_layers"] == 1 and layer["hidden_size"] == 64 and layer["head_dim"] == 16
    assert layer["max_position_embeddings"] >= 4096 and layer["vocab_size"] == 256
    assert layer["rope_parameters"] == draft.config.rope_parameters and layer["rope_theta"] == 500000.0
    assert layer["tie_word_embeddings"] is False
    if fmt == "sglang":  # SGLang adds 1: its id i is the output of layer i
        assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 64
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
        assert "eagle_aux_hidden_state_layer_ids" not in config  # vLLM would read it as given
    elif fmt == "vllm":  # vLLM's id i is the input of layer i = hidden_states[i]
        assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 64
        assert config["eagle_aux_hidden_state_layer_ids"] == AUX and "eagle_config" not in config
    else:
        assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 64
        assert config["eagle_aux_hidden_state_layer_ids"] == AUX
        assert config["norm_before_residual"] is False  # vLLM assumes true when absent
        assert config["speculators_config"]["verifier"] == {"name_or_path": "tiny/llama",
                                                            "architectures": ["LlamaForCausalLM"]}
        assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert check_export(out, target.config) == []


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_eagle1_names_shapes(tmp_path, fmt):
    target, draft = make_draft("eagle1")
    out = export(draft, target, tmp_path / "x", fmt)
    found = {k: shape for k, (shape, _) in header(out).items()}
    layer = {"layers.0." + name: found["layers.0." + name] for name in LAYER}
    assert layer["layers.0.self_attn.q_proj.weight"] == [64, 64] and layer["layers.0.mlp.down_proj.weight"] == [64, 128]
    assert found["fc.weight"] == [64, 128]
    assert not {"layers.0.input_layernorm.weight", "norm.weight", "lm_head.weight"} & set(found)
    config = config_of(out)
    if fmt == "sglang":
        assert config["architectures"] == ["LlamaForCausalLMEagle"]
        assert found["fc.bias"] == [64] and "embed_tokens.weight" not in found  # SGLang takes the target's
    else:  # vLLM prefixes "Eagle" itself; its fc has no bias, so the bias lives in the draft's embedding
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert "fc.bias" not in found and found["embed_tokens.weight"] == [256, 64]
    assert check_export(out, target.config) == []


def test_readme_has_the_serving_commands(tmp_path):
    target, draft = make_draft()
    sglang = export(draft, target, tmp_path / "s", "sglang", num_speculative_tokens=4)
    text = (sglang / "README.md").read_text()
    for flag in ("--speculative-algorithm EAGLE3", f"--speculative-draft-model-path {sglang.resolve()}",
                 "--speculative-num-steps 4", "--speculative-eagle-topk", "--speculative-num-draft-tokens 5"):
        assert flag in text
    vllm = export(draft, target, tmp_path / "v", "vllm")
    assert f'--speculative-config \'{{"method": "eagle3", "model": "{vllm.resolve()}", "num_speculative_tokens": 3}}\'' \
        in (vllm / "README.md").read_text()
    speculators = export(draft, target, tmp_path / "p", "speculators")
    assert f"vllm serve {speculators.resolve()}\n" in (speculators / "README.md").read_text()


def test_dtype_and_embeddings_options(tmp_path):
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "x", "vllm", dtype="bfloat16", embeddings=True)
    found = header(out)
    assert found["embed_tokens.weight"] == ([256, 64], torch.bfloat16) and found["fc.weight"][1] == torch.bfloat16
    assert found["d2t"][1] == torch.int64 and config_of(out)["torch_dtype"] == "bfloat16"
    assert check_export(out, target.config) == []
    assert load_exported(out).fc.weight.dtype == torch.bfloat16  # the embedding is in the folder


def test_full_vocabulary_writes_no_mapping(tmp_path):
    target, draft = make_draft(vocab=256)
    out = export(draft, target, tmp_path / "x", "vllm")  # vLLM has no d2t parameter when Vd == V
    assert not {"d2t", "t2d"} & set(header(out))
    assert check_export(out, target.config) == []
    rewrite(out, change={"d2t": torch.zeros(256, dtype=torch.long)})
    assert any("d2t is present" in p for p in check_export(out, target.config))


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("fmt", ["sglang", "vllm", "speculators"])
def test_eagle3_round_trip_identical_logits(tmp_path, family, fmt):
    target, draft = make_draft(family=family)
    out = export(draft, target, tmp_path / "x", fmt)
    loaded = load_exported(out, target=target)
    assert loaded.config.aux_layer_ids == AUX and loaded.config.rope_parameters == draft.config.rope_parameters
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    assert torch.equal(draft_logits(loaded, target), draft_logits(draft, target))


@pytest.mark.parametrize("flag, value", [("norm_before_residual", True), ("norm_before_residual", None)])
def test_load_refuses_speculators_layouts_it_does_not_implement(tmp_path, flag, value):
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "x", "speculators")
    config = json.loads((out / "config.json").read_text())
    if value is None:
        config.pop(flag)  # vLLM reads an absent norm_before_residual as true
    else:
        config[flag] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=flag):
        load_exported(out, target=target)


# ---------------------------------------------------------------------------------------------
# EAGLE 3.1 options: vLLM's norm_before_fc / fc_norm / norm_output flags, refused by SGLang
# ---------------------------------------------------------------------------------------------

EAGLE31 = {"norm_before_fc+feed": dict(norm_before_fc=True, feed_normed_hidden=True),
           "fc_norm+feed": dict(fc_norm=True, feed_normed_hidden=True), "feed": dict(feed_normed_hidden=True),
           "norm_before_fc": dict(norm_before_fc=True)}
FLAGS = {"norm_before_fc": "norm_before_fc", "fc_norm": "fc_norm", "feed_normed_hidden": "norm_output"}


def chain_logits(draft, target, seed=1):
    """Logits of two chained steps: the second reads the first's state (fed back as trained)."""
    torch.manual_seed(seed)
    ids = torch.randint(3, 256, (2, 11))
    features = draft_features(target_outputs(target, ids)[0], draft.config)
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        state = draft(ids, draft.project(features), positions)
        return torch.cat([draft.logits(state), draft.logits(draft(ids.roll(-1, 1), state, positions + 1))])


@pytest.mark.parametrize("fmt", ["vllm", "speculators"])
@pytest.mark.parametrize("options", EAGLE31.values(), ids=EAGLE31.keys())
def test_eagle31_options_export_and_round_trip(tmp_path, fmt, options):
    target, draft = make_draft(**options)
    out = export(draft, target, tmp_path / "x", fmt)
    config = config_of(out)
    assert {flag: config[flag] for flag in FLAGS.values()} == {FLAGS[o]: options.get(o, False) for o in FLAGS}
    assert config["norm_before_residual"] is False
    found = header(out)
    assert ("input_norm.weight" in found) == bool(options.get("norm_before_fc"))
    if options.get("norm_before_fc"):
        assert found["input_norm.weight"][0] == [192]
    assert {k for k in found if k.startswith("fc_norm.")} == (
        {f"fc_norm.{i}.weight" for i in range(3)} if options.get("fc_norm") else set())
    assert check_export(out) == [] and check_export(out, target.config) == []
    loaded = load_exported(out, target=target)
    assert {o: getattr(loaded.config, o) for o in FLAGS} == {o: options.get(o, False) for o in FLAGS}
    assert torch.equal(chain_logits(loaded, target), chain_logits(draft, target))


@pytest.mark.parametrize("options", [EAGLE31["norm_before_fc+feed"], EAGLE31["fc_norm+feed"]],
                         ids=["concat", "per_layer"])
def test_eagle31_norms_follow_unsorted_aux_layers(tmp_path, options):
    """Engines concatenate aux states in layer order: the norms' per-layer parts move with fc's blocks."""
    target, draft = make_draft(aux=[4, 1, 3], **options)
    out = export(draft, target, tmp_path / "x", "vllm")
    found = load_file(str(out / "model.safetensors"))
    if options.get("fc_norm"):  # engine layer order 1, 3, 4 = our fc_norm 1, 2, 0
        assert [torch.equal(found[f"fc_norm.{j}.weight"], draft.fc_norm[i].weight) for j, i in enumerate([1, 2, 0])] \
            == [True] * 3
    loaded = load_exported(out, target=target)
    assert loaded.config.aux_layer_ids == [1, 3, 4]
    assert torch.allclose(chain_logits(loaded, target), chain_logits(draft, target), atol=1e-5)


@pytest.mark.parametrize("option", FLAGS)
def test_sglang_refuses_eagle31_options(tmp_path, option):
    target, draft = make_draft(**{option: True})
    with pytest.raises(ValueError, match=f"the sglang format cannot express {option}.*--format vllm or speculators"):
        export(draft, target, tmp_path / "x", "sglang")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["vllm", "speculators"])
@pytest.mark.parametrize("flag", FLAGS.values())
def test_check_catches_a_flipped_norm_flag(tmp_path, fmt, flag):
    """A flag flipped in config.json loads without error in vLLM and drafts another function."""
    options = EAGLE31["fc_norm+feed"] if flag == "fc_norm" else EAGLE31["norm_before_fc+feed"]
    target, draft = make_draft(**options)
    out = export(draft, target, tmp_path / "x", fmt)
    trained = config_of(out)[flag]
    rewrite(out, config={flag: not trained})
    expected = f"{flag} is {not trained!r}, expected {trained!r} (baldeagle_export.json)"
    assert any(p.startswith(expected) for p in check_export(out)), check_export(out)
    assert any(p.startswith(expected) for p in check_export(out, target.config))


def test_check_reads_norm_before_fc_where_vllm_does(tmp_path):
    """vLLM takes eagle_config.norm_before_fc over the top-level key; the check reads it the same way."""
    target, draft = make_draft(**EAGLE31["norm_before_fc+feed"])
    out = export(draft, target, tmp_path / "x", "vllm")
    rewrite(out, config={"eagle_config": {"norm_before_fc": False}})
    problems = check_export(out)
    assert any(p.startswith("norm_before_fc is False, expected True (baldeagle_export.json)") for p in problems)
    assert any("input_norm.weight is present but vLLM does not read norm_before_fc as true" in p for p in problems)


def test_check_and_load_of_flags_an_engine_cannot_hold(tmp_path):
    target, draft = make_draft()
    sglang = export(draft, target, tmp_path / "s", "sglang")
    rewrite(sglang, config={"norm_output": True})
    assert any(p.startswith("norm_output is true: SGLang's LlamaForCausalLMEagle3 does not read it")
               for p in check_export(sglang))
    with pytest.raises(ValueError, match="norm_output is true: SGLang"):
        load_exported(sglang, target=target)
    speculators = export(draft, target, tmp_path / "p", "speculators")
    rewrite(speculators, config={"norm_before_fc": True})  # the flag, but no input_norm.weight
    assert any("missing tensor input_norm.weight" in p for p in check_export(speculators))
    with pytest.raises(ValueError, match=r"missing \['input_norm.weight'\]"):
        load_exported(speculators, target=target)
    rewrite(speculators, config={"fc_norm": True})
    assert any("norm_before_fc and fc_norm are both true" in p for p in check_export(speculators))
    with pytest.raises(ValueError, match="norm_before_fc and fc_norm are both true"):
        load_exported(speculators, target=target)


def test_an_older_export_record_without_the_options_still_checks(tmp_path):
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "x", "vllm")
    info = json.loads((out / "baldeagle_export.json").read_text())
    for option in FLAGS:
        del info["draft_config"][option]
    (out / "baldeagle_export.json").write_text(json.dumps(info))
    assert check_export(out) == []
    rewrite(out, config={"norm_output": True})
    assert any(p.startswith("norm_output is True, expected False") for p in check_export(out))


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_eagle1_round_trip(tmp_path, fmt):
    target, draft = make_draft("eagle1", family="qwen2")  # attention biases and linear RoPE too
    out = export(draft, target, tmp_path / "x", fmt)
    loaded = load_exported(out, target=target)
    expected, got = draft_logits(draft, target), draft_logits(loaded, target)
    if fmt == "sglang":
        assert torch.equal(got, expected)
    else:  # fc.bias folded into the embedding: the same function up to float rounding
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_unsorted_aux_layers_are_reordered_with_fc(tmp_path):
    """Engines concatenate aux states in layer order: ids are sorted and fc's blocks permuted along."""
    target, draft = make_draft(aux=[4, 1, 3])
    out = export(draft, target, tmp_path / "x", "vllm")
    assert config_of(out)["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    loaded = load_exported(out, target=target)
    assert loaded.config.aux_layer_ids == [1, 3, 4]
    assert torch.allclose(draft_logits(loaded, target), draft_logits(draft, target), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# --check catches each violation
# ---------------------------------------------------------------------------------------------


def exported(tmp_path, fmt="vllm", kind="eagle3"):
    target, draft = make_draft(kind)
    return target, export(draft, target, tmp_path / "x", fmt)


def test_check_wrong_d2t_offsets(tmp_path):
    target, out = exported(tmp_path)
    d2t = load_file(str(out / "model.safetensors"))["d2t"].clone()
    d2t[1] = d2t[0] - 1  # draft id 1 → the target id of draft id 0
    rewrite(out, change={"d2t": d2t})
    problems = check_export(out, target.config)
    assert any("d2t maps 1 draft ids onto target ids already taken" in p for p in problems)
    assert any("t2d disagrees with d2t" in p for p in problems)
    rewrite(out, change={"d2t": d2t + 1000})
    assert any("outside the target vocabulary" in p for p in check_export(out, target.config))


def test_check_t2d_disagrees(tmp_path):
    target, out = exported(tmp_path)
    t2d = load_file(str(out / "model.safetensors"))["t2d"].clone()
    t2d[int(t2d.long().argmin())] = True  # one id too many
    rewrite(out, change={"t2d": t2d})
    assert any("t2d disagrees with d2t: it marks 65 ids" in p for p in check_export(out, target.config))


def test_check_missing_lm_head(tmp_path):
    target, out = exported(tmp_path)
    rewrite(out, drop=["lm_head.weight"])
    assert any("missing tensor lm_head.weight" in p for p in check_export(out, target.config))


def test_check_hidden_size_mismatch(tmp_path):
    target, out = exported(tmp_path)
    rewrite(out, config={"hidden_size": 32})
    problems = check_export(out, target.config)
    assert any(p.startswith("hidden size mismatch: config.json says hidden_size=32") and "fc.weight gives 64" in p
               for p in problems)


def test_check_short_max_positions(tmp_path):
    target, out = exported(tmp_path)
    rewrite(out, config={"max_position_embeddings": 2048})
    expected = "max_position_embeddings is 2048, expected at least 4096 (the target's"
    assert any(expected in p for p in check_export(out, target.config))
    assert any(expected in p for p in check_export(out))  # the target's value recorded at export time


def test_check_aux_ids(tmp_path):
    target, out = exported(tmp_path)
    rewrite(out, config={"eagle_aux_hidden_state_layer_ids": [3, 1, 4]})
    assert any("not strictly increasing" in p for p in check_export(out, target.config))
    rewrite(out, config={"eagle_aux_hidden_state_layer_ids": [1, 3, 7]})
    assert any("outside [0, 6]" in p for p in check_export(out, target.config))


def test_check_engine_specific_traps(tmp_path):
    target, draft = make_draft()
    sglang = export(draft, target, tmp_path / "s", "sglang")
    tensors = load_file(str(sglang / "model.safetensors"))
    renamed = {k.replace("midlayer.", "layers.0."): v for k, v in tensors.items()}
    save_file(renamed, str(sglang / "model.safetensors"))
    problems = check_export(sglang, target.config)
    assert any("SGLang" in p and "silently skips" in p for p in problems)
    assert any("missing tensor midlayer.self_attn.q_proj.weight" in p for p in problems)

    vllm = export(draft, target, tmp_path / "v", "vllm")
    rewrite(vllm, config={"tie_word_embeddings": True, "torch_dtype": "bfloat16", "dtype": "bfloat16"})
    problems = check_export(vllm, target.config)
    assert any("tie_word_embeddings is true" in p for p in problems)
    assert any("declares dtype bfloat16 but the weights are ['float32']" in p for p in problems)

    speculators = export(draft, target, tmp_path / "p", "speculators")
    config = config_of(speculators)
    del config["norm_before_residual"]
    config["speculators_config"]["verifier"]["name_or_path"] = ""
    (speculators / "config.json").write_text(json.dumps(config))
    problems = check_export(speculators, target.config)
    assert any("norm_before_residual is not false" in p for p in problems)
    assert any("verifier.name_or_path is empty" in p for p in problems)


def test_check_eagle1_bias_rules(tmp_path):
    target, draft = make_draft("eagle1")
    vllm = export(draft, target, tmp_path / "v", "vllm")
    rewrite(vllm, change={"fc.bias": torch.zeros(64)})
    assert any("vLLM's EAGLE-1 fc has no bias" in p for p in check_export(vllm, target.config))
    sglang = export(draft, target, tmp_path / "s", "sglang")
    rewrite(sglang, drop=["fc.bias"], change={"layers.0.input_layernorm.weight": torch.ones(64)})
    problems = check_export(sglang, target.config)
    assert any("missing tensor fc.bias" in p for p in problems)
    assert any("input_layernorm" in p for p in problems)


def test_check_unreadable_or_foreign_folders(tmp_path):
    assert "is missing" in check_export(tmp_path)[0]
    target, out = exported(tmp_path)
    rewrite(out, config={"architectures": ["MistralForCausalLM"]})
    problems = check_export(out, target.config)
    assert "architectures is ['MistralForCausalLM'], expected ['LlamaForCausalLMEagle3']" in problems[0]
    assert "names no EAGLE architecture" in problems[1]


# ---------------------------------------------------------------------------------------------
# --check compares every field an engine reads with training (baldeagle_export.json) and the target
# ---------------------------------------------------------------------------------------------


def edit_layer(folder, drop=(), **values):
    """Change or drop keys of the layer config (top level, or speculators' transformer_layer_config)."""
    config = config_of(folder)
    layer = config.get("transformer_layer_config", config)
    for key in drop:
        layer.pop(key)
    layer.update(values)
    (folder / "config.json").write_text(json.dumps(config))


def short_positions(folder, fmt):
    edit_layer(folder, max_position_embeddings=2048)
    return "max_position_embeddings is 2048, expected at least 4096"


def other_engines_aux_ids(folder, fmt):
    """The classic slip: the other engine's convention (AUX = [1, 3, 4] are hidden_states ids)."""
    if fmt == "sglang":
        config = config_of(folder)
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = AUX
        (folder / "config.json").write_text(json.dumps(config))
        return "eagle_config.eagle_aux_hidden_state_layer_ids is [1, 3, 4], expected [0, 2, 3]"
    rewrite(folder, config={"eagle_aux_hidden_state_layer_ids": [0, 2, 3]})
    return "eagle_aux_hidden_state_layer_ids is [0, 2, 3], expected [1, 3, 4]"


def missing_d2t(folder, fmt):
    rewrite(folder, drop=["d2t"])
    return "missing tensor d2t: found none, expected shape [64]"


def eagle1_architecture(folder, fmt):
    rewrite(folder, config={"architectures": ["LlamaForCausalLMEagle"]})
    return "architectures is ['LlamaForCausalLMEagle'], expected ['LlamaForCausalLMEagle3']"


def changed_rope_theta(folder, fmt):
    edit_layer(folder, rope_theta=10000.0)
    return "rope_theta is 10000.0, expected 500000.0"


def deleted_rope_theta(folder, fmt):
    edit_layer(folder, drop=["rope_theta"])
    return "rope_theta is missing, expected 500000.0"


def changed_rope_parameters(folder, fmt):
    edit_layer(folder, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return ("rope_parameters is {'rope_type': 'default', 'rope_theta': 10000.0}, "
            "expected {'rope_type': 'default', 'rope_theta': 500000.0}")


def changed_hidden_act(folder, fmt):
    edit_layer(folder, hidden_act="gelu")
    return "hidden_act is 'gelu', expected 'silu'"


BROKEN = [short_positions, other_engines_aux_ids, missing_d2t, eagle1_architecture, changed_rope_theta,
          deleted_rope_theta, changed_rope_parameters, changed_hidden_act]
TARGET_FIELDS = [short_positions, changed_rope_theta, deleted_rope_theta, changed_rope_parameters, changed_hidden_act]


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "speculators"])
@pytest.mark.parametrize("breakage", BROKEN, ids=lambda f: f.__name__)
def test_check_catches_each_broken_export(tmp_path, breakage, fmt):
    """Each breakage is named (field, value found, value expected) from the export record alone and
    from the target's config alone where the target knows the field."""
    if breakage is eagle1_architecture and fmt == "speculators":
        pytest.skip("speculators folders name no engine architecture (vLLM sets it from speculators_model_type)")
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "x", fmt)
    assert check_export(out) == [] and check_export(out, target.config) == []
    message = breakage(out, fmt)
    source = "" if breakage is missing_d2t else "baldeagle_export.json"  # a tensor the config.json implies
    assert any(message in p and source in p for p in check_export(out)), check_export(out)
    assert any(message in p for p in check_export(out, target.config))
    if breakage in TARGET_FIELDS:
        (out / "baldeagle_export.json").unlink()
        assert any(message in p and "the target's config" in p for p in check_export(out, target.config))


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 32), ("num_attention_heads", 8), ("num_key_value_heads", 1), ("head_dim", 32),
    ("intermediate_size", 256), ("rms_norm_eps", 1e-6), ("vocab_size", 512), ("attention_bias", True),
    ("draft_vocab_size", 32), ("rope_scaling", {"rope_type": "linear", "factor": 2.0})])
def test_check_names_each_changed_field(tmp_path, field, value):
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "x", "vllm")
    before = config_of(out)[field]
    edit_layer(out, **{field: value})
    expected = f"{field} is {value!r}, expected {before!r} (baldeagle_export.json"
    assert any(p.startswith(expected) for p in check_export(out, target.config)), check_export(out, target.config)


def test_check_eagle1_architecture_and_fields(tmp_path):
    target, draft = make_draft("eagle1")
    out = export(draft, target, tmp_path / "x", "vllm")
    rewrite(out, config={"architectures": ["LlamaForCausalLMEagle"], "hidden_act": "relu"})  # SGLang's name
    problems = check_export(out, target.config)
    assert any("architectures is ['LlamaForCausalLMEagle'], expected ['LlamaForCausalLM'] for an eagle1 draft "
               "in the vllm format" in p for p in problems)
    assert any("hidden_act is 'relu', expected 'silu' (baldeagle_export.json, the target's config)" in p
               for p in problems)


def test_check_with_model_uses_the_targets_config(tmp_path, capsys):
    """`baldeagle export --check DIR --model M`: without the export record the target's config decides."""
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "x", "speculators")
    target.config.save_pretrained(tmp_path / "target")
    (out / "baldeagle_export.json").unlink()
    edit_layer(out, drop=["rope_theta", "rope_parameters"])  # readers fall back to 10000
    with pytest.raises(ValueError, match="problem"):
        run_export(ExportConfig(check=str(out), model=str(tmp_path / "target")))
    printed = capsys.readouterr().out
    assert "problem: rope_theta is missing, expected 500000.0 (the target's config)" in printed
    assert "problem: rope_parameters is {'rope_type': 'default', 'rope_theta': 10000.0}, expected" in printed


@pytest.mark.parametrize("damage", ["truncated", "header only", "garbage", "empty"])
def test_corrupt_weights_are_named_not_a_traceback(tmp_path, capsys, damage):
    target, out = exported(tmp_path)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) - 100], "header only": data[:200],
                         "garbage": b"not a safetensors file " * 8, "empty": b""}[damage])
    problems = check_export(out, target.config)
    assert problems == [problems[0]] and problems[0].startswith(f"{weights} is truncated or corrupt")
    with pytest.raises(ValueError, match=re.escape(f"{weights} is truncated or corrupt")):
        load_exported(out, target=target)
    with pytest.raises(ValueError, match="1 problem"):
        run_export(ExportConfig(check=str(out)))
    assert f"problem: {weights} is truncated or corrupt" in capsys.readouterr().out


def test_corrupt_config_is_named(tmp_path):
    target, out = exported(tmp_path)
    (out / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"], ')
    assert check_export(out)[0].startswith(f"{out / 'config.json'} is not readable JSON")
    with pytest.raises(ValueError, match="config.json is not readable JSON"):
        load_exported(out, target=target)


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "speculators"])
def test_readme_commands_are_shell_quoted(tmp_path, fmt):
    """A path with spaces, quotes and a `$` comes back exactly from `shlex.split` of each command."""
    target, draft = make_draft()
    out = export(draft, target, tmp_path / "my draft's \"export\" $HOME", fmt)
    path = str(out.resolve())
    text = (out / "README.md").read_text()
    commands = [shlex.split(block.replace("\\\n", " ")) for block in re.findall(r"```bash\n(.*?)```", text, re.S)]
    assert shlex.split(re.search(r"Check it: `(.*)`", text).group(1)) == ["baldeagle", "export", "--check", path]
    if fmt == "sglang":
        (command,) = commands
        assert command[command.index("--speculative-draft-model-path") + 1] == path
        return
    spec = [json.loads(c[c.index("--speculative-config") + 1]) for c in commands if "--speculative-config" in c]
    assert spec == [{"method": "eagle3", "model": path, "num_speculative_tokens": 3}]
    assert (fmt == "speculators") == (["vllm", "serve", path] in commands)
    python = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    call = next(n for n in ast.walk(ast.parse(python)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LLM")
    assert ast.literal_eval(call.keywords[1].value) == spec[0]


# ---------------------------------------------------------------------------------------------
# Refusals and the stage function
# ---------------------------------------------------------------------------------------------


def test_refuses_unknown_target(tmp_path):
    target, draft = make_draft()
    draft.config.target_model = ""
    with pytest.raises(ValueError, match="records no target model"):
        export(draft, target, tmp_path / "x", "vllm")
    assert not (tmp_path / "x").exists()
    assert export_draft(draft, tmp_path / "y", "vllm", target="tiny/llama", target_config=target.config).is_dir()


def test_refuses_inconsistent_vocab_mapping(tmp_path):
    target, draft = make_draft()
    t2d = draft.t2d.clone()
    draft.t2d[int(t2d.long().argmin())] = True
    with pytest.raises(ValueError, match="t2d does not mark exactly"):
        export(draft, target, tmp_path / "x", "vllm")
    draft.t2d.copy_(t2d)
    draft.d2t[1] = draft.d2t[0] - 1  # two draft ids → one target id
    with pytest.raises(ValueError, match="several draft ids onto the same target id"):
        export(draft, target, tmp_path / "x", "vllm")
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_output_without_overwrite(tmp_path):
    target, draft = make_draft()
    (tmp_path / "empty").mkdir()
    assert export(draft, target, tmp_path / "empty", "vllm").is_dir()  # an empty folder is fine
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(draft, target, tmp_path / "empty", "sglang")
    export(draft, target, tmp_path / "empty", "sglang", overwrite=True)
    assert config_of(tmp_path / "empty")["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]


def test_refuses_what_no_engine_serves(tmp_path):
    target, draft = make_draft("eagle1")
    with pytest.raises(ValueError, match="EAGLE-3 drafts only"):
        export(draft, target, tmp_path / "x", "speculators")
    for aux, message in (([2, 3, 3], "repeat a layer"), ([1, 3, 6], "final \\(normed\\) output")):
        target, draft = make_draft(aux=aux)
        with pytest.raises(ValueError, match=message):
            export(draft, target, tmp_path / "x", "vllm")
    with pytest.raises(ValueError, match="format must be one of"):
        export(draft, target, tmp_path / "x", "tgi")


def test_run_export_and_check(tmp_path, capsys):
    target, draft = make_draft()
    save_draft(draft, tmp_path / "draft")
    out = run_export(ExportConfig(draft=str(tmp_path / "draft"), format="speculators", out=str(tmp_path / "x")))
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert run_export(ExportConfig(check=str(out))) == []
    assert "ok" in capsys.readouterr().out
    rewrite(out, drop=["lm_head.weight"])
    with pytest.raises(ValueError, match="1 problem"):
        run_export(ExportConfig(check=str(out)))
    assert "problem: missing tensor lm_head.weight" in capsys.readouterr().out
