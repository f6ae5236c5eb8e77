"""Configuration precedence and errors, through the real CLI parser."""

import dataclasses

import pytest

from baldeagle.cli import RUNNERS, build_parser, main, parse_config
from baldeagle.config import STAGES, ConfigError, PrepareConfig, TrainConfig, load_config, write_resolved


def test_precedence_defaults_yaml_overrides_flags(tmp_path):
    config = tmp_path / "prep.yaml"
    config.write_text("max_length: 100\nlimit: 5\ndataset: mtbench\nshuffle: true\n")
    stage, cfg = parse_config(
        ["prepare", "--config", str(config), "limit=7", "seed=3", "--seed", "4", "--no-shuffle"]
    )
    assert stage == "prepare"
    assert cfg.max_length == 100  # from YAML
    assert cfg.limit == 7  # key=value beats YAML
    assert cfg.seed == 4  # --flag beats key=value
    assert cfg.shuffle is False  # --no-flag beats YAML
    assert cfg.dataset == "mtbench"
    assert cfg.model == PrepareConfig().model  # default untouched


def test_train_user_turns_is_a_prepare_key_and_flag(tmp_path):
    assert PrepareConfig().train_user_turns is False
    assert parse_config(["prepare", "train_user_turns=true"])[1].train_user_turns is True
    assert parse_config(["prepare", "--train-user-turns"])[1].train_user_turns is True
    with pytest.raises(ConfigError, match="train_user_turns"):
        parse_config(["prepare", "train_user_turns=maybe"])


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("max_lenght: 100\n")
    with pytest.raises(ConfigError, match=r"max_lenght.*bad\.yaml"):
        parse_config(["prepare", "--config", str(config)])


def test_unknown_override_and_bad_types_are_errors():
    with pytest.raises(ConfigError, match="nonsense"):
        parse_config(["train", "nonsense=1"])
    with pytest.raises(ConfigError, match="ttt_steps.*int"):
        parse_config(["train", "ttt_steps=many"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_config(["train", "ttt_steps"])


def test_list_and_dict_fields_parse(tmp_path):
    _, cfg = parse_config(["train", "aux_layer_ids=[1,5,9]", "lr_scheduler_kwargs={num_cycles: 2}"])
    assert cfg.aux_layer_ids == [1, 5, 9]
    assert cfg.lr_scheduler_kwargs == {"num_cycles": 2}
    _, cfg = parse_config(["train", "--aux-layer-ids", "2,4"])
    assert cfg.aux_layer_ids == [2, 4]
    _, cfg = parse_config(["train", "--aux_layer_ids", "[]"])
    assert cfg.aux_layer_ids == []


def test_every_trainer_field_is_a_typed_train_key(tmp_path, capsys):
    """TrainConfig is a TrainingArguments: any Trainer field is set by name from YAML, key=value or a
    flag, typed by HfArgumentParser (enums checked against their choices), and listed by --help."""
    import dataclasses

    from transformers import TrainingArguments
    from transformers.training_args import OptimizerNames

    config = tmp_path / "train.yaml"
    config.write_text("adam_epsilon: 1.0e-6\nlogging_first_step: true\n")
    _, cfg = parse_config(["train", "--config", str(config), "optim=sgd", "--eval-strategy", "epoch",
                           "--dataloader_drop_last", "--torch-empty-cache-steps", "7"])
    assert isinstance(cfg, TrainingArguments)
    assert (cfg.adam_epsilon, cfg.logging_first_step, cfg.optim, cfg.eval_strategy, cfg.dataloader_drop_last,
            cfg.torch_empty_cache_steps) == (1e-6, True, OptimizerNames.SGD, "epoch", True, 7)
    assert cfg.output_dir == cfg.out == TrainConfig().out
    with pytest.raises(ConfigError, match=r"^optim \(from key=value overrides\) must be one of .*adamw_torch"):
        parse_config(["train", "optim=adamw_imaginary"])
    with pytest.raises(ConfigError, match=r"unknown key 'adam_epsilom' .*did you mean adam_epsilon"):
        parse_config(["train", "adam_epsilom=1e-6"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    fixed = {"output_dir", "remove_unused_columns", "label_names"}  # `out`, and what the collator and objective need
    settable = [spec.name for spec in dataclasses.fields(TrainingArguments) if spec.init and spec.name not in fixed]
    missing = [name for name in settable if "--" + name.replace("_", "-") not in out]
    assert len(settable) > 100 and not missing
    assert "--adam-epsilon ADAM_EPSILON" in out and "(float; default: 1e-08)" in " ".join(out.split())


def test_positional_field_and_overrides_together():
    _, cfg = parse_config(["view", "runs/x", "rows=5"])
    assert cfg.data == "runs/x" and cfg.rows == 5
    _, cfg = parse_config(["view", "rows=5"])
    assert cfg.data == "" and cfg.rows == 5


def test_resolved_config_round_trips(tmp_path):
    cfg = TrainConfig(ttt_steps=3, aux_layer_ids=[1, 2, 3])
    path = write_resolved(cfg, tmp_path)
    assert load_config(TrainConfig, path) == cfg


def test_eagle31_train_keys_parse_and_round_trip(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("fc_norm: true\n")
    _, cfg = parse_config(["train", "--config", str(config), "--feed-normed-hidden"])
    assert (cfg.norm_before_fc, cfg.fc_norm, cfg.feed_normed_hidden) == (False, True, True)
    assert load_config(TrainConfig, write_resolved(cfg, tmp_path / "resolved")) == cfg
    _, cfg = parse_config(["train", "norm_before_fc=true"])
    assert cfg.norm_before_fc and not cfg.fc_norm and not cfg.feed_normed_hidden
    assert not any(getattr(TrainConfig(), key) for key in ("norm_before_fc", "fc_norm", "feed_normed_hidden"))


def test_loss_and_init_layer_train_keys_parse_and_round_trip(tmp_path):
    assert (TrainConfig().loss, TrainConfig().init_from_target_layer) == ("kl", -1)  # both off by default
    config = tmp_path / "train.yaml"
    config.write_text("loss: lk\ninit_from_target_layer: 3\n")
    _, cfg = parse_config(["train", "--config", str(config)])
    assert (cfg.loss, cfg.init_from_target_layer) == ("lk", 3)
    assert load_config(TrainConfig, write_resolved(cfg, tmp_path / "resolved")) == cfg
    _, cfg = parse_config(["train", "loss=kl", "--init-from-target-layer", "0"])
    assert (cfg.loss, cfg.init_from_target_layer) == ("kl", 0)
    with pytest.raises(ConfigError, match=r"^init_from_target_layer \(from key=value overrides\) must be at least -1"):
        parse_config(["train", "init_from_target_layer=-2"])
    with pytest.raises(ConfigError, match=r"^init_from_target_layer \(from key=value overrides\) must be int"):
        parse_config(["train", "init_from_target_layer=last"])


def test_label_temperature_train_key_parses_and_round_trips(tmp_path):
    assert TrainConfig().label_temperature == 1.0  # the target's own distribution by default
    config = tmp_path / "train.yaml"
    config.write_text("label_temperature: 0.5\n")
    _, cfg = parse_config(["train", "--config", str(config)])
    assert cfg.label_temperature == 0.5
    assert load_config(TrainConfig, write_resolved(cfg, tmp_path / "resolved")) == cfg
    with pytest.raises(ConfigError, match=r"^label_temperature \(from key=value overrides\) must be above 0, got 0.0"):
        parse_config(["train", "label_temperature=0"])


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for stage in ("prepare", "view", "train", "quickstart"):
        assert stage in out


@pytest.mark.parametrize("stage", sorted(RUNNERS))
def test_every_stage_help_prints(stage, capsys):
    """`baldeagle STAGE --help` formats every help string (a bare % once crashed argparse)."""
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: baldeagle " + stage) and "--config" in out


def test_quickstart_help_shows_percent_signs(capsys):
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    assert "regeneration gets 25%, training 40%" in " ".join(capsys.readouterr().out.split())


def test_malformed_yaml_file_is_a_config_error_naming_the_file(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("max_length: [100\nlimit: 5\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*not valid YAML"):
        parse_config(["prepare", "--config", str(config)])


@pytest.mark.parametrize("argv, key, problem", [
    (["train", "aux_layer_ids=[1"], "aux_layer_ids", "not valid YAML"),
    (["train", "lr_scheduler_kwargs={num_cycles: "], "lr_scheduler_kwargs", "not valid YAML"),
    (["prepare", "max_length=[1"], "max_length", "must be int"),
    (["train", "--aux-layer-ids", "[1,"], "aux_layer_ids", "not valid YAML"),
])
def test_malformed_yaml_override_is_a_config_error_naming_the_key(argv, key, problem, capsys):
    with pytest.raises(ConfigError, match=rf"{key} \(from .*\).*{problem}"):
        parse_config(argv)
    assert main(argv) == 2 and key in capsys.readouterr().err


@pytest.mark.parametrize("argv, key, words", [
    (["prepare", "--limit", "-1"], "limit", "at least 0, got -1"),
    (["regenerate", "limit=-2"], "limit", "at least 0, got -2"),
    (["regenerate", "--batch-size", "0"], "batch_size", "at least 1, got 0"),
    (["eval", "--limit", "-3"], "limit", "at least 0, got -3"),
    (["eval", "top_p=1.5"], "top_p", "at most 1, got 1.5"),
    (["serve-bench", "--limit", "-3"], "limit", "at least 0"),
    (["features", "--shard-tokens", "0"], "shard_tokens", "at least 1"),
    (["features", "max_bytes=-5"], "max_bytes", "at least 0"),
    (["train", "eval_fraction=1.0"], "eval_fraction", "below 1"),
    (["train", "--learning-rate", "0"], "learning_rate", "above 0"),
    (["view", "runs/x", "--rows", "-1"], "rows", "at least 1"),
    (["export", "num_speculative_tokens=0"], "num_speculative_tokens", "at least 1"),
    (["quickstart", "--minutes", "-5"], "minutes", "above 0"),
])
def test_numeric_options_out_of_range_name_the_key(argv, key, words, capsys):
    with pytest.raises(ConfigError, match=rf"^{key} \(from .*\) must be {words}"):
        parse_config(argv)
    assert main(argv) == 2 and f"error: {key} " in capsys.readouterr().err


def test_numeric_bounds_apply_to_yaml_files_and_allow_the_edges(tmp_path):
    config = tmp_path / "prep.yaml"
    config.write_text("limit: -1\n")
    with pytest.raises(ConfigError, match=r"limit \(from .*prep\.yaml\) must be at least 0"):
        parse_config(["prepare", "--config", str(config)])
    _, cfg = parse_config(["train", "max_steps=-1", "eval_fraction=0", "seed=0"])
    assert cfg.max_steps == -1 and cfg.eval_fraction == 0
    _, cfg = parse_config(["eval", "top_p=1", "temperature=0", "limit=0"])
    assert cfg.top_p == 1 and cfg.limit == 0


def test_quickstart_trains_with_the_packaged_config(tmp_path):
    """The quickstart's training settings come from the file inside the package (what a wheel
    installs), not from a checkout folder; TrainConfig's defaults would be 7 / 32000 / 1e-4 / 1 / 0 / off."""
    from pathlib import Path

    import baldeagle
    from baldeagle.config import QuickstartConfig
    from baldeagle.quickstart import QUICKSTART_TRAIN, quickstart_train_config, training_target_dtype

    assert QUICKSTART_TRAIN.is_relative_to(Path(baldeagle.__file__).parent)
    cfg = quickstart_train_config(QuickstartConfig(out=str(tmp_path)))
    assert (cfg.ttt_steps, cfg.draft_vocab_size, cfg.learning_rate, cfg.per_device_train_batch_size,
            cfg.feature_cache_gb, cfg.muon, cfg.muon_ns_steps) == (2, 8192, 1e-3, 4, 2, True, 3)
    assert cfg.data == str(tmp_path / "prepared") and cfg.out == str(tmp_path / "train")
    assert cfg.bf16 == (training_target_dtype() == "bfloat16")  # the draft under bf16 autocast where it is native
    # The quickstart's data: 300 self-written prompts over kinds of task, no chitchat (BENCHMARKS.md).
    defaults = QuickstartConfig()
    assert (defaults.conversations, defaults.self_prompts, defaults.self_prompt_openings) == (0, 300, "tasks")


def test_quickstart_without_its_config_is_an_error(tmp_path, monkeypatch):
    import baldeagle.quickstart as quickstart
    from baldeagle.config import QuickstartConfig

    monkeypatch.setattr(quickstart, "QUICKSTART_TRAIN", tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        quickstart.quickstart_train_config(QuickstartConfig(out=str(tmp_path)))


def test_a_runtime_error_inside_a_stage_keeps_its_traceback(monkeypatch):
    """A torch error (RuntimeError) is a bug or a real failure, not a user's mistake: `main` lets it
    propagate with its traceback instead of printing one line."""
    from baldeagle import cli

    def failing_stage(stage, cfg):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(cli, "run_stage", failing_stage)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        main(["prepare", "--limit", "1"])


@pytest.mark.parametrize("error", ["BaldEagleError", "FileNotFoundError", "FileExistsError", "ValueError"])
def test_a_user_error_inside_a_stage_exits_2_with_its_message(error, monkeypatch, capsys):
    from baldeagle import cli, errors

    kind = getattr(errors, error, None) or {"FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError,
                                            "ValueError": ValueError}[error]

    def failing_stage(stage, cfg):
        raise kind("runs/x holds no draft: train one first")

    monkeypatch.setattr(cli, "run_stage", failing_stage)
    assert main(["prepare", "--limit", "1"]) == 2
    assert capsys.readouterr().err == "baldeagle: error: runs/x holds no draft: train one first\n"


def test_every_project_error_type_is_a_baldeagle_error():
    from baldeagle.data.prepare import PrepareError
    from baldeagle.data.sources import SourceError
    from baldeagle.data.store import DiskSpaceError
    from baldeagle.data.store_reader import StoreError
    from baldeagle.data.template import TemplateError
    from baldeagle.errors import BaldEagleError
    from baldeagle.io import OutputError

    for kind in (ConfigError, PrepareError, SourceError, DiskSpaceError, StoreError, TemplateError, OutputError):
        assert issubclass(kind, BaldEagleError) and issubclass(kind, ValueError), kind
    assert not issubclass(RuntimeError, BaldEagleError)


def test_every_shipped_training_config_resolves(tmp_path):
    """Each YAML in configs/ (and the packaged quickstart's) loads as a TrainConfig with the values it
    names, and its resolved form loads back to the same settings."""
    from pathlib import Path

    import yaml

    from baldeagle.quickstart import QUICKSTART_TRAIN

    repo = Path(__file__).resolve().parents[2]
    files = sorted((repo / "configs").glob("*.yaml")) + [QUICKSTART_TRAIN]
    assert len(files) >= 4
    for path in files:
        cfg = load_config(TrainConfig, path)
        for key, value in yaml.safe_load(path.read_text()).items():
            got = getattr(cfg, key)  # Trainer keeps report_to as a list ("none": empty) and enums as str enums
            assert got == value or got == [value] or str(got) == str(value) or (key, value, got) == (
                "report_to", "none", []), (path.name, key, got)
        assert cfg.output_dir == cfg.out
        resolved = write_resolved(cfg, tmp_path / path.stem)
        assert load_config(TrainConfig, resolved) == cfg, path.name


def test_an_old_training_args_mapping_still_loads_key_by_key(tmp_path, caplog):
    """Configs from before TrainConfig held Trainer's fields: `training_args:` keys load as top-level
    keys, typed and checked like them, with a warning; a wrong key in it is named."""
    config = tmp_path / "old.yaml"
    config.write_text("ttt_steps: 3\ntraining_args: {optim: sgd, adam_epsilon: 1.0e-6}\n")
    _, cfg = parse_config(["train", "--config", str(config), "training_args={logging_first_step: true}"])
    assert (cfg.ttt_steps, cfg.optim, cfg.adam_epsilon, cfg.logging_first_step) == (3, "sgd", 1e-6, True)
    assert "training_args (in " in caplog.text and "no longer needed" in caplog.text
    with pytest.raises(ConfigError, match=r"unknown key 'adam_epsilom' in .*old\.yaml, training_args"):
        config.write_text("training_args: {adam_epsilom: 1.0e-6}\n")
        parse_config(["train", "--config", str(config)])


# Trainer bools that TrainingArguments refuses on their own (they need other keys set with them),
# and the two the machine decides: use_cpu (TrainConfig sets it wherever there is no accelerator)
# and dataloader_pin_memory (TrainingArguments turns it off without one)
NEEDS_OTHER_KEYS = {"load_best_model_at_end", "use_cpu", "dataloader_pin_memory"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_bool_key_is_settable_both_ways(stage):
    """`--x`, `--no-x`, `x=true` and `x=false` for every bool field of every stage, whatever its
    default (a field defaulting to true once lost `--no-x` and refused `x=false` as not text)."""
    cls = STAGES[stage]
    bools = [f.name for f in dataclasses.fields(cls) if f.init and f.type in (bool, "bool")
             and f.name not in NEEDS_OTHER_KEYS]
    positional = [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    base = [stage, *(["somewhere"] if positional else [])]
    for name in bools:
        flag = name.replace("_", "-")
        for argv, expected in (([f"--{flag}"], True), ([f"--no-{flag}"], False),
                               ([f"{name}=true"], True), ([f"{name}=false"], False)):
            _, cfg = parse_config([*base, *argv])
            assert getattr(cfg, name) is expected, (stage, argv)
