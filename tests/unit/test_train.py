"""Training end to end on a tiny in-process target: learning, resume, and bad input."""

import json

import pytest
import torch

from baldeagle.config import ConfigError, TrainConfig
from baldeagle.model.checkpoint import load_draft
from baldeagle.train.run import run_train
from train_fixtures import save_prepared, save_tiny_target


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "model": str(save_tiny_target(root / "target")),
        "data": str(save_prepared(root / "prepared")),
        "root": root,
    }


def config(ws, out, **changes) -> TrainConfig:
    base = dict(model=ws["model"], data=ws["data"], out=str(ws["root"] / out), ttt_steps=2,
                draft_vocab_size=128, learning_rate=3e-3, warmup_steps=0, max_steps=30,
                per_device_train_batch_size=4, logging_steps=1, save_steps=1000, eval_fraction=0.25,
                max_length=64, train_sampling_strategy="sequential")
    base.update(changes)
    return TrainConfig(**base)


def losses(out_dir) -> dict[int, float]:
    history = json.loads((out_dir / "final" / "metrics.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_training_lowers_loss_and_writes_a_loadable_draft(workspace, draft_type):
    cfg = config(workspace, f"run-{draft_type}", draft_type=draft_type)
    metrics = run_train(cfg)
    history = losses(workspace["root"] / f"run-{draft_type}")
    first, last = history[1], history[max(history)]
    assert last < 0.8 * first, history
    assert "eval_acc_0" in metrics and "eval_tau_sim" in metrics
    assert 1.0 <= metrics["eval_tau_sim"] <= 1.0 + cfg.ttt_steps
    draft = load_draft(workspace["root"] / f"run-{draft_type}" / "final", expected_type=draft_type)
    assert draft.config.hidden_size == 64
    logged = json.loads((workspace["root"] / f"run-{draft_type}" / "final" / "metrics.json").read_text())
    train_logs = [h for h in logged["log_history"] if "acc_0" in h]
    assert train_logs and all(0.0 <= h["acc_0"] <= 1.0 for h in train_logs)


def test_resume_gives_the_same_next_losses(workspace):
    straight = config(workspace, "straight", max_steps=6, save_steps=3, eval_fraction=0.0)
    run_train(straight)
    reference = losses(workspace["root"] / "straight")
    # Same run, "killed" after the checkpoint at step 3: drop what came later, then --resume.
    interrupted = workspace["root"] / "straight"
    import shutil

    shutil.rmtree(interrupted / "checkpoint-6")
    shutil.rmtree(interrupted / "final")
    run_train(config(workspace, "straight", max_steps=6, save_steps=3, eval_fraction=0.0, resume=True))
    resumed = losses(interrupted)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed, reference)


def test_existing_output_needs_resume_or_overwrite(workspace):
    out = workspace["root"] / "occupied"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        run_train(config(workspace, "occupied"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_train(config(workspace, "occupied", resume=True))


def test_checkpoint_of_another_draft_type_is_refused(workspace):
    run_train(config(workspace, "typed", max_steps=2, save_steps=2, eval_fraction=0.0))
    with pytest.raises(ValueError, match="eagle3 draft, but eagle1"):
        run_train(config(workspace, "typed", draft_type="eagle1", max_steps=4, resume=True))


def test_bad_data_and_settings_fail_before_training(workspace, tmp_path):
    untrained = save_prepared(tmp_path / "untrained", trained=False)
    with pytest.raises(ValueError, match="no trained tokens"):
        run_train(config(workspace, "x1", data=str(untrained)))
    big = save_prepared(tmp_path / "bigvocab", vocab=1000)
    with pytest.raises(ValueError, match="another tokenizer"):
        run_train(config(workspace, "x2", data=str(big)))
    with pytest.raises(ValueError, match="aux layer id 9"):
        run_train(config(workspace, "x3", aux_layer_ids=[1, 2, 9]))
    with pytest.raises(ValueError, match="ttt_step_weight"):
        run_train(config(workspace, "x5", ttt_step_weight=0.0))
    # a draft vocabulary above the target's (256 tokens): refused from the target's config alone
    with pytest.raises(ConfigError, match=r"draft_vocab_size=300 is above the target's vocabulary of 256 tokens"):
        run_train(config(workspace, "x6", draft_vocab_size=300, data=str(tmp_path / "no-such-data")))
    run_train(config(workspace, "x7", draft_vocab_size=256, max_steps=1))  # the full vocabulary is fine
    assert not (workspace["root"] / "x1").exists()


@pytest.mark.parametrize("option", ["norm_before_fc", "fc_norm", "feed_normed_hidden"])
def test_eagle1_with_an_eagle31_option_is_refused_before_any_work(workspace, option, monkeypatch):
    from baldeagle.config import ConfigError
    from baldeagle.train import run

    monkeypatch.setattr(run, "load_prepared", lambda *a: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=f"draft_type=eagle1 does not support {option}"):
        run_train(config(workspace, "e1", draft_type="eagle1", **{option: True}))
    with pytest.raises(ConfigError, match="norm_before_fc and fc_norm exclude each other"):
        run_train(config(workspace, "e1", norm_before_fc=True, fc_norm=True))
    assert not (workspace["root"] / "e1").exists()


def test_eagle31_options_reach_the_trained_draft_and_resume_keeps_them(workspace):
    options = dict(fc_norm=True, feed_normed_hidden=True)
    run_train(config(workspace, "e31", max_steps=4, save_steps=2, eval_fraction=0.0, **options))
    draft = load_draft(workspace["root"] / "e31" / "final", expected_type="eagle3")
    assert draft.config.fc_norm and draft.config.feed_normed_hidden and not draft.config.norm_before_fc
    assert not torch.equal(draft.fc_norm[0].weight, torch.ones(64))  # trained
    with pytest.raises(ValueError, match="trained with fc_norm=True, this run asks for fc_norm=False"):
        run_train(config(workspace, "e31", max_steps=6, save_steps=2, eval_fraction=0.0, resume=True,
                         feed_normed_hidden=True))


def test_loss_lk_trains_an_eagle3_draft(workspace):
    run_train(config(workspace, "lk", loss="lk", max_steps=12, eval_fraction=0.0))  # 6 batches, seen twice
    history = losses(workspace["root"] / "lk")
    first, second = sum(history[s] for s in range(1, 7)), sum(history[s] for s in range(7, 13))
    assert all(torch.isfinite(torch.tensor(list(history.values())))) and second < 0.8 * first, history


def test_bad_loss_and_init_settings_are_refused_before_any_work(workspace, monkeypatch):
    from baldeagle.train import run

    monkeypatch.setattr(run, "load_prepared", lambda *a: pytest.fail("work started"))
    with pytest.raises(ConfigError, match="loss must be kl or lk, got 'ce'"):
        run_train(config(workspace, "bad", loss="ce"))
    with pytest.raises(ConfigError, match="loss=lk is an EAGLE-3 loss: draft_type=eagle1 trains with its own"):
        run_train(config(workspace, "bad", draft_type="eagle1", loss="lk"))
    with pytest.raises(ConfigError, match="init_from_target_layer must be a target decoder layer index .* got -2"):
        run_train(config(workspace, "bad", init_from_target_layer=-2))
    with pytest.raises(ConfigError, match=r"init_from_target_layer=6 is not a layer of the target .*6 decoder layers"):
        run_train(config(workspace, "bad", init_from_target_layer=6))
    assert not (workspace["root"] / "bad").exists()


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_init_from_target_layer_starts_from_its_weights_trains_and_resume_keeps_training(workspace, draft_type,
                                                                                         monkeypatch):
    from transformers import AutoModelForCausalLM

    from baldeagle.train import run

    built = {}

    def build_and_keep(*args, **kwargs):
        draft = build_draft(*args, **kwargs)
        built.setdefault("state", {k: v.clone() for k, v in draft.state_dict().items()})
        return draft

    build_draft = run.build_draft
    monkeypatch.setattr(run, "build_draft", build_and_keep)
    out = f"init-{draft_type}"
    run_train(config(workspace, out, draft_type=draft_type, init_from_target_layer=2, max_steps=2, save_steps=2,
                     eval_fraction=0.0))
    target = AutoModelForCausalLM.from_pretrained(workspace["model"]).model.layers[2].state_dict()
    state, prefix = built["state"], "midlayer." if draft_type == "eagle3" else "layers.0."
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        weight = state[prefix + name]
        if draft_type == "eagle3":  # [embedding half = 0 | feature half = the target's]
            assert torch.equal(weight[:, :64], torch.zeros_like(weight[:, :64]))
            weight = weight[:, 64:]
        assert torch.equal(weight, target[name]), name
    for name in ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "post_attention_layernorm.weight"):
        assert torch.equal(state[prefix + name], target[name]), name
    if draft_type == "eagle3":
        assert torch.equal(state["midlayer.hidden_norm.weight"], target["input_layernorm.weight"])
    history = losses(workspace["root"] / out)
    assert sorted(history) == [1, 2] and all(torch.isfinite(torch.tensor(list(history.values()))))
    trained = load_draft(workspace["root"] / out / "final", expected_type=draft_type).state_dict()
    assert not torch.equal(trained[prefix + "mlp.down_proj.weight"], target["mlp.down_proj.weight"])  # it trained
    # --resume continues from the checkpoint: the draft is never initialised from the target again
    from baldeagle.model import eagle1, eagle3

    for module in (eagle1, eagle3):
        monkeypatch.setattr(module, "init_layer_from_target", lambda *a: pytest.fail("re-initialised on --resume"))
    run_train(config(workspace, out, draft_type=draft_type, init_from_target_layer=2, max_steps=3, save_steps=2,
                     eval_fraction=0.0, resume=True))
    assert sorted(losses(workspace["root"] / out)) == [1, 2, 3]


def test_non_finite_loss_names_the_step(workspace):
    cfg = config(workspace, "nan", learning_rate=1e12, max_steps=20, max_grad_norm=0.0,
                 adam_epsilon=1e-30)
    with pytest.raises(FloatingPointError, match=r"at step \d+ on a batch of rows"):
        run_train(cfg)


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_offline_store_gives_the_same_first_losses_as_online(workspace, draft_type):
    from baldeagle.config import FeaturesConfig
    from baldeagle.data.store import run_features

    store = workspace["root"] / f"store-{draft_type}"
    run_features(FeaturesConfig(model=workspace["model"], data=workspace["data"], out=str(store),
                                draft_type=draft_type, max_length=64, batch_tokens=256, shard_tokens=512))
    common = dict(draft_type=draft_type, max_steps=3, eval_fraction=0.0, feature_noise=0.0)
    run_train(config(workspace, f"online-{draft_type}", **common))
    run_train(config(workspace, f"offline-{draft_type}", mode="offline", features=str(store), **common))
    online, offline = losses(workspace["root"] / f"online-{draft_type}"), losses(workspace["root"] / f"offline-{draft_type}")
    assert sorted(online) == sorted(offline) == [1, 2, 3]
    for step in online:  # the store holds bf16 features: agreement to bf16 precision, not bit-exact
        assert offline[step] == pytest.approx(online[step], rel=2e-2), (step, online, offline)


def test_offline_store_must_cover_max_length(workspace):
    from baldeagle.config import FeaturesConfig
    from baldeagle.data.store import run_features

    store = workspace["root"] / "store-short"
    run_features(FeaturesConfig(model=workspace["model"], data=workspace["data"], out=str(store),
                                draft_type="eagle3", max_length=32))
    with pytest.raises(ValueError, match="exceeds the store's max_length"):
        run_train(config(workspace, "offline-short", mode="offline", features=str(store)))


def test_rows_longer_than_max_length_are_truncated_or_skipped_and_counted(workspace):
    """The prepared rows are 48, 44, 40 and 36 tokens (6 each) trained from token 24, 22, 20, 18:
    at max_length=23 the 48-token rows have no trained token left and are skipped, the others are
    cut to 23 tokens; both are counted in metrics.json, and an epoch has only the kept rows' steps."""
    out = workspace["root"] / "long-rows"
    run_train(config(workspace, "long-rows", max_length=23, max_steps=-1, num_train_epochs=1, eval_fraction=0.0))
    data = json.loads((out / "final" / "metrics.json").read_text())["data"]
    assert data == {"rows": 18, "rows_truncated": 18, "rows_skipped_too_long": 6, "max_length": 23}
    assert max(losses(out)) == 5  # ceil(18 rows / batch 4) steps, not ceil(24 / 4)
    full = json.loads(run_and_read(workspace, "short-rows", max_length=64))["data"]
    assert full == {"rows": 24, "rows_truncated": 0, "rows_skipped_too_long": 0, "max_length": 64}
    with pytest.raises(ValueError, match=r"no row has a trained token within its first max_length=18 tokens"):
        run_train(config(workspace, "no-rows", max_length=18))
    assert not (workspace["root"] / "no-rows" / "final").exists()


def run_and_read(workspace, out, **changes) -> str:
    run_train(config(workspace, out, max_steps=1, eval_fraction=0.0, **changes))
    return (workspace["root"] / out / "final" / "metrics.json").read_text()


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_every_trained_token_weighs_the_same_across_accumulation(workspace, draft_type):
    """Batch 1 × accumulation 8 equals batch 8 × accumulation 1 on rows with different trained-token
    counts: the same logged loss and the same weights after one (SGD) optimizer step."""
    common = dict(draft_type=draft_type, max_steps=1, eval_fraction=0.0, feature_noise=0.0, max_grad_norm=0.0,
                  learning_rate=0.5, optim="sgd")
    run_train(config(workspace, f"ga8-{draft_type}", per_device_train_batch_size=1,
                     gradient_accumulation_steps=8, **common))
    run_train(config(workspace, f"b8-{draft_type}", per_device_train_batch_size=8, **common))
    accumulated, batched = workspace["root"] / f"ga8-{draft_type}", workspace["root"] / f"b8-{draft_type}"
    assert losses(accumulated)[1] == pytest.approx(losses(batched)[1], rel=1e-5)
    a, b = final_weights(accumulated), final_weights(batched)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name


def test_held_out_rows_without_trained_tokens_report_no_eval_loss(workspace, monkeypatch, caplog):
    import baldeagle.train.run as run

    split = run.split_rows

    def untrained_eval_rows(*args, **kwargs):
        train_rows, eval_rows = split(*args, **kwargs)
        return train_rows, eval_rows.map(lambda row: {"loss_mask": [0] * len(row["loss_mask"])})

    monkeypatch.setattr(run, "split_rows", untrained_eval_rows)
    with caplog.at_level("WARNING"):
        metrics = run_train(config(workspace, "untrained-eval", max_steps=2))
    assert "eval_loss" not in metrics, metrics  # not a misleading 0.0
    assert "no trained tokens" in caplog.text


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_resume_with_the_default_sampler_gives_the_same_losses_and_weights(workspace, draft_type):
    """Train 8 steps straight vs 4, stop, resume to 8 with the default length-grouped sampler
    (shuffled, so the data order must come back exactly); 3 steps an epoch, so the stop lies inside
    the second epoch and the resumed run crosses into the third."""
    import shutil

    def settings(out, **changes):
        cfg = config(workspace, out, draft_type=draft_type, max_steps=8, save_steps=4, eval_fraction=0.0,
                     per_device_train_batch_size=8, train_sampling_strategy="group_by_length", **changes)
        assert cfg.train_sampling_strategy == TrainConfig().train_sampling_strategy  # the default sampler
        return cfg

    run_train(settings(f"grouped-{draft_type}"))
    reference, reference_weights = losses(workspace["root"] / f"grouped-{draft_type}"), final_weights(
        workspace["root"] / f"grouped-{draft_type}")
    stopped = workspace["root"] / f"grouped-{draft_type}"
    shutil.rmtree(stopped / "checkpoint-8")
    shutil.rmtree(stopped / "final")
    run_train(settings(f"grouped-{draft_type}", resume=True))
    resumed, weights = losses(stopped), final_weights(stopped)
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed, reference)
    assert weights.keys() == reference_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], atol=1e-6, rtol=1e-5, msg=name)


class Killed(BaseException):
    """Stands in for a kill (SIGKILL, OOM) in the middle of a write."""


def test_a_kill_during_a_checkpoint_save_leaves_no_partial_checkpoint(workspace, monkeypatch, caplog):
    import baldeagle.model.checkpoint as checkpoint

    common = dict(max_steps=6, save_steps=3, eval_fraction=0.25, eval_steps=0)
    run_train(config(workspace, "kill-reference", **common))
    reference = json.loads((workspace["root"] / "kill-reference" / "final" / "metrics.json").read_text())
    save_file = checkpoint.save_file

    def killed_in_checkpoint_6(tensors, filename, **kwargs):  # draft_config.json is already written
        if "checkpoint-6" in filename:
            raise Killed
        return save_file(tensors, filename, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", killed_in_checkpoint_6)
    out = workspace["root"] / "killed"
    with pytest.raises(Killed):
        run_train(config(workspace, "killed", **common))
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert not (out / "checkpoint-6").exists() and (out / "checkpoint-3" / "optimizer.pt").is_file()
    assert list(out.glob(".*.partial"))  # what the kill left, hidden
    (out / ".final.x1y2.partial").mkdir()  # and what a kill during the final save leaves
    with caplog.at_level("WARNING"):
        run_train(config(workspace, "killed", resume=True, **common))
    assert not list(out.glob(".*.partial")) and "killed while writing" in caplog.text
    resumed = json.loads((out / "final" / "metrics.json").read_text())
    assert resumed["eval_before_training"] == reference["eval_before_training"] != {}
    for step in (4, 5, 6):
        assert losses(out)[step] == pytest.approx(losses(workspace["root"] / "kill-reference")[step], rel=1e-5)


def test_resume_skips_incomplete_checkpoints_and_names_damaged_files(workspace, caplog):
    import shutil

    common = dict(max_steps=4, save_steps=2, eval_fraction=0.0)
    base = workspace["root"] / "ckpt-base"
    run_train(config(workspace, "ckpt-base", **common))

    def copy(name):
        shutil.copytree(base, workspace["root"] / name)
        shutil.rmtree(workspace["root"] / name / "final")
        return workspace["root"] / name / "checkpoint-4"

    last = copy("incomplete")  # as a version that saved in place left it
    (last / "model.safetensors").unlink()
    (last / "trainer_state.json").unlink()
    with caplog.at_level("WARNING"):
        run_train(config(workspace, "incomplete", resume=True, **common))
    assert "skipping the incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert (last / "model.safetensors").is_file() and (last / "trainer_state.json").is_file()  # saved anew
    for name in ("model.safetensors", "optimizer.pt"):
        path = copy(f"damaged-{name}") / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(ValueError, match=rf"checkpoint-4/{name} is damaged"):
            run_train(config(workspace, f"damaged-{name}", resume=True, **common))


def test_a_checkpoint_made_for_another_target_says_so(workspace, tmp_path):
    wide = save_tiny_target(tmp_path / "wide", hidden_size=96, intermediate_size=192)
    run_train(config(workspace, "narrow", max_steps=2, save_steps=2, eval_fraction=0.0))
    message = "made for another target: hidden size 64, this target has 96"
    with pytest.raises(ValueError, match=message):
        run_train(config(workspace, "narrow", model=str(wide), max_steps=4, resume=True))
    with pytest.raises(ValueError, match=message):
        load_draft(workspace["root"] / "narrow" / "final", target_config=json.loads((wide / "config.json").read_text()))
    from transformers import AutoConfig

    from baldeagle.export import export_draft

    with pytest.raises(ValueError, match=message):
        export_draft(load_draft(workspace["root"] / "narrow" / "final"), tmp_path / "export", "vllm",
                     target=str(wide), target_config=AutoConfig.from_pretrained(wide))


def test_time_budget_runs_on_the_clock_it_is_given():
    """The budget stops training after `minutes` on its clock; the trainer hands it one that stands
    still during evaluations, so scoring a run often does not shorten its training."""
    from types import SimpleNamespace

    from baldeagle.train.trainer import TimeBudget

    now = [100.0]
    budget = TimeBudget(minutes=1.0, clock=lambda: now[0])
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    budget.on_train_begin(None, None, control)
    now[0] += 59.0
    assert not budget.on_step_end(None, None, control).should_training_stop
    now[0] += 2.0
    assert budget.on_step_end(None, None, control).should_training_stop and control.should_save


def test_a_target_with_sliding_window_layers_is_refused_by_train_export_and_eval(workspace, tmp_path):
    """A Qwen2 target whose layers after the first use sliding-window attention: `train`, `export` and `eval`
    each refuse it with a message naming the layer type and layers, before any work."""
    from baldeagle.config import EvalConfig, ExportConfig
    from baldeagle.conventions import unsupported_attention
    from baldeagle.decode.evaluate import run_eval
    from baldeagle.export import run_export

    sliding = save_tiny_target(tmp_path / "sliding", "qwen2", use_sliding_window=True, sliding_window=8,
                               max_window_layers=1)
    message = r"sliding_attention in layers \[1, 2, 3, 4, 5\].*full-attention targets only"
    with pytest.raises(ConfigError, match=message):
        run_train(config(workspace, "sliding", model=str(sliding)))
    assert not (workspace["root"] / "sliding").exists()
    draft = workspace["root"] / "sliding-draft"
    run_train(config(workspace, "sliding-draft", max_steps=1))
    with pytest.raises(ConfigError, match=message):
        run_export(ExportConfig(draft=str(draft / "final"), model=str(sliding), out=str(tmp_path / "export")))
    assert not (tmp_path / "export").exists()
    with pytest.raises(ConfigError, match=message):
        run_eval(EvalConfig(model=str(sliding), draft=str(draft / "final"), out=str(tmp_path / "eval"), limit=1))
    # full attention everywhere: nothing to refuse (Llama, and Qwen2 without its sliding window)
    assert unsupported_attention(save_and_read(tmp_path, "llama")) == {}
    assert unsupported_attention(save_and_read(tmp_path, "qwen2")) == {}


def save_and_read(tmp_path, name):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(save_tiny_target(tmp_path / f"plain-{name}", name))


@pytest.mark.parametrize("draft_type,loss", [("eagle3", "kl"), ("eagle3", "lk"), ("eagle1", "kl")])
def test_features_kept_in_memory_give_the_same_losses_over_epochs(workspace, draft_type, loss):
    # Reused EAGLE-3 rows take their labels from the draft vocabulary's head and kept statistics.
    common = dict(draft_type=draft_type, max_steps=-1, num_train_epochs=3, eval_fraction=0.0, feature_noise=0.0,
                  loss=loss)
    run_train(config(workspace, f"uncached-{draft_type}-{loss}", **common))
    run_train(config(workspace, f"cached-{draft_type}-{loss}", feature_cache_gb=0.5, **common))
    uncached = losses(workspace["root"] / f"uncached-{draft_type}-{loss}")
    cached = losses(workspace["root"] / f"cached-{draft_type}-{loss}")
    assert sorted(cached) == sorted(uncached) and len(cached) == 18  # 24 rows, 4 per step, 3 epochs
    for step in uncached:
        assert cached[step] == pytest.approx(uncached[step], rel=1e-5, abs=1e-6), (step, uncached, cached)
    history = json.loads((workspace["root"] / f"cached-{draft_type}-{loss}" / "final" / "metrics.json").read_text())
    reused = [h["feature_rows_reused"] for h in history["log_history"] if "feature_rows_reused" in h]
    assert reused and reused[-1] == 48  # epochs 2 and 3 read every row from memory


def test_feature_cache_is_refused_offline(workspace):
    with pytest.raises(ConfigError, match="feature_cache_gb is for mode=online"):
        run_train(config(workspace, "cache-offline", mode="offline", features="somewhere", feature_cache_gb=1))



def test_freeze_lm_head_keeps_the_targets_rows_and_trains_the_rest(workspace):
    from safetensors.torch import load_file

    from baldeagle.model.vocab import used_ids_from_d2t

    run_train(config(workspace, "head-frozen", freeze_lm_head=True, max_steps=12, eval_fraction=0.0))
    run_train(config(workspace, "head-trained", max_steps=12, eval_fraction=0.0))
    frozen, trained = final_weights(workspace["root"] / "head-frozen"), final_weights(workspace["root"] / "head-trained")
    target = load_file(str(next((workspace["root"] / "target").glob("*.safetensors"))))
    head = target.get("lm_head.weight", target["model.embed_tokens.weight"])  # tied embeddings
    rows = head[used_ids_from_d2t(frozen["d2t"])]
    assert torch.equal(frozen["lm_head.weight"], rows)  # never moved
    assert not torch.equal(trained["lm_head.weight"], rows)  # moves by default
    history = losses(workspace["root"] / "head-frozen")  # 6 batches, seen twice: the rest still learns
    assert sum(history[s] for s in range(7, 13)) < 0.9 * sum(history[s] for s in range(1, 7)), history


def test_feature_dropout_changes_training_only(workspace):
    def run(out, **changes):
        run_train(config(workspace, out, max_steps=3, feature_noise=0.0, **changes))
        return json.loads((workspace["root"] / out / "final" / "metrics.json").read_text())

    plain, dropped = run("dropout-0"), run("dropout-half", feature_dropout=0.5)
    first = [next(h["loss"] for h in m["log_history"] if "loss" in h) for m in (plain, dropped)]
    assert first[0] != pytest.approx(first[1], rel=1e-4)  # the first step's loss reads dropped features
    before = [m["eval_before_training"]["eval_loss"] for m in (plain, dropped)]
    assert before[0] == pytest.approx(before[1], rel=1e-6)  # evaluation reads them whole


def test_label_temperature_is_refused_for_eagle1_and_at_zero(workspace, monkeypatch):
    from baldeagle.train import run

    monkeypatch.setattr(run, "load_prepared", lambda *a: pytest.fail("work started"))
    with pytest.raises(ConfigError, match="label_temperature is for EAGLE-3 drafts: draft_type=eagle1"):
        run_train(config(workspace, "bad", draft_type="eagle1", label_temperature=0.5))
    with pytest.raises(ConfigError, match="label_temperature must be > 0, got 0.0"):
        run_train(config(workspace, "bad", label_temperature=0.0))


def test_feature_dropout_is_refused_for_eagle1_and_out_of_range(workspace, monkeypatch):
    from baldeagle.train import run

    monkeypatch.setattr(run, "load_prepared", lambda *a: pytest.fail("work started"))
    with pytest.raises(ConfigError, match="feature_dropout is for EAGLE-3 drafts: draft_type=eagle1"):
        run_train(config(workspace, "bad", draft_type="eagle1", feature_dropout=0.1))
    with pytest.raises(ConfigError, match=r"feature_dropout must be in \[0, 1\), got 1.0"):
        run_train(config(workspace, "bad", feature_dropout=1.0))
