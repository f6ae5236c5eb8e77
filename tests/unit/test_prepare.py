"""`prepare`: skips by reason, strict mode, atomic output, overwrite, truncation, load_prepared."""

import json

import datasets
import pytest
from tiny_chat import CHATML, DEFAULT_SYSTEM, char_tokenizer, save_tokenizer, trained_runs

from baldeagle import cli
from baldeagle.config import PrepareConfig
from baldeagle.data import prepare
from baldeagle.data.prepare import PrepareError, load_prepared, run_prepare, worker_count

# ChatML that refuses a system message, so one row can fail in the template itself.
NO_SYSTEM = CHATML.replace(
    "{% if not messages", "{% if messages and messages[0].role == 'system' %}"
    "{{ raise_exception('system messages are not supported') }}{% endif %}{% if not messages"
)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD = [user("Hi"), assistant("Hello!"), user("Bye"), assistant("See you.")]
ROWS = [
    GOOD,                                                               # 0 kept
    [user("Only a question")],                                          # 1 no_assistant_turn
    [user("   "), assistant("x")],                                      # 2 empty_content
    [user("Hi"), {"role": "tool", "content": "{}"}, assistant("ok")],   # 3 unknown_role
    [user("Hi"), assistant(None)],                                      # 4 non_string_content
    [user("Hi"), user("Hi again"), assistant("ok")],                    # 5 consecutive_same_role
    [user("x" * 300), assistant("late")],                               # 6 too_long
    [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("ok")],  # 7 template_error
    [user("One"), assistant("Two")],                                    # 8 kept
]


@pytest.fixture()
def model(tmp_path):
    """A char-level tokenizer folder with a template that raises on system messages."""
    return str(save_tokenizer(char_tokenizer(NO_SYSTEM), tmp_path / "model"))


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    return str(path)


def config(tmp_path, model, rows=ROWS, **kwargs):
    data = write_rows(tmp_path / "rows.jsonl", rows)
    return PrepareConfig(model=model, dataset=data, **{"out": str(tmp_path / "out"), "max_length": 256, **kwargs})


def test_bad_rows_are_skipped_and_counted(tmp_path, model, capsys):
    stats = run_prepare(config(tmp_path, model))
    assert stats["skipped"] == {
        "no_assistant_turn": 1, "empty_content": 1, "unknown_role": 1, "non_string_content": 1,
        "consecutive_same_role": 1, "too_long": 1, "template_error": 1, "malformed_line": 0,
    }
    assert stats["rows_in"] == 9 and stats["rows_kept"] == 2
    dataset, saved = load_prepared(tmp_path / "out")
    assert saved == json.loads((tmp_path / "out" / "stats.json").read_text()) and saved["rows_kept"] == 2
    assert dataset.column_names == ["input_ids", "loss_mask"]
    tokenizer = char_tokenizer(NO_SYSTEM)
    runs = [trained_runs(tokenizer, row["input_ids"], row["loss_mask"]) for row in dataset]
    assert runs == [["Hello!<|im_end|>", "See you.<|im_end|>"], ["Two<|im_end|>"]]
    assert stats["tokens"] == sum(len(r["input_ids"]) for r in dataset)
    assert stats["trained_tokens"] == len("Hello!See you.Two") + 3
    assert stats["chat_template"] == NO_SYSTEM and len(stats["chat_template_sha256"]) == 64
    assert stats["model"] == model and stats["tokenizer"] and stats["provenance"]["argv"]
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert "prepared 2 of 9 rows" in capsys.readouterr().out


def test_train_user_turns_adds_the_users_words_to_the_mask(tmp_path, model):
    default = run_prepare(config(tmp_path, model))
    default_rows = load_prepared(tmp_path / "out")[0]
    stats = run_prepare(config(tmp_path, model, train_user_turns=True, overwrite=True))
    dataset, saved = load_prepared(tmp_path / "out")
    assert saved["train_user_turns"] is True and default["train_user_turns"] is False
    tokenizer = char_tokenizer(NO_SYSTEM)
    runs = [trained_runs(tokenizer, row["input_ids"], row["loss_mask"]) for row in dataset]
    # Row 6's question now has trained tokens inside max_length: kept, cut after its header (the
    # default system prompt and the user header), no longer too_long.
    header = tokenizer(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)
    question = 256 - len(header["input_ids"])
    assert runs == [["Hi<|im_end|>", "Hello!<|im_end|>", "Bye<|im_end|>", "See you.<|im_end|>"], ["x" * question],
                    ["One<|im_end|>", "Two<|im_end|>"]]
    assert stats["skipped"]["too_long"] == 0 and stats["rows_truncated"] == 1
    assert [dataset[0]["input_ids"], dataset[2]["input_ids"]] == default_rows["input_ids"]
    assert stats["trained_tokens"] == default["trained_tokens"] + len("HiByeOne") + 3 + question


def test_strict_names_the_row_and_leaves_nothing(tmp_path, model):
    with pytest.raises(PrepareError, match="row 1: no_assistant_turn"):
        run_prepare(config(tmp_path, model, strict=True))
    rows = [GOOD] * 5 + [[user("Only a question")]] + [GOOD] * 5
    with pytest.raises(PrepareError, match="row 5: no_assistant_turn"):  # numbered as in the file
        run_prepare(config(tmp_path, model, rows=rows, strict=True, shuffle=True, seed=4))
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "rows.jsonl"]


def test_malformed_lines_are_skipped_and_counted_and_strict_names_file_and_line(tmp_path, model, capsys):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"messages": GOOD}), '{"messages": [{"role": "user", "content": "cut sh', "",
             json.dumps({"messages": [user("One"), assistant("Two")]}), '"just a string"', "[1, 2"]
    path.write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(model=model, dataset=str(path), out=str(tmp_path / "out"), max_length=256)
    stats = run_prepare(cfg)
    assert stats["rows_in"] == 5 and stats["rows_kept"] == 2 and stats["skipped"]["malformed_line"] == 3
    assert "skipped: malformed_line 3" in capsys.readouterr().out
    cfg.strict, cfg.overwrite = True, True
    with pytest.raises(PrepareError, match=rf"row 1: malformed_line: {path}:2: not valid JSON"):
        run_prepare(cfg)


def test_failure_while_saving_leaves_no_loadable_folder(tmp_path, model, monkeypatch):
    def half_save(self, path, **kwargs):
        original(self, path, **kwargs)  # the dataset is written completely...
        raise OSError("disk full")  # ...then the run dies before stats.json

    original = datasets.Dataset.save_to_disk
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", half_save)
    with pytest.raises(OSError, match="disk full"):
        run_prepare(config(tmp_path, model))
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "rows.jsonl"]
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(tmp_path / "out"))


def test_overwrite(tmp_path, model):
    first = run_prepare(config(tmp_path, model, limit=1))
    assert first["rows_kept"] == 1
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_prepare(config(tmp_path, model))
    assert load_prepared(tmp_path / "out")[1]["rows_kept"] == 1  # untouched
    second = run_prepare(config(tmp_path, model, overwrite=True))
    assert second["rows_kept"] == 2 and len(load_prepared(tmp_path / "out")[0]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "rows.jsonl"]


def test_max_length_keeps_whole_turns_up_to_the_limit(tmp_path, model):
    cfg = config(tmp_path, model, rows=[GOOD])
    cfg.max_length = 0
    full = run_prepare(cfg)
    row = load_prepared(tmp_path / "out")[0][0]
    trained = [i for i in range(full["tokens"]) if row["loss_mask"][i]]
    # Cut 5 tokens into the second answer: the first turn stays whole, the second is cut.
    cut = trained[len("Hello!") + 1 + 5]
    cfg.max_length, cfg.overwrite = cut, True
    stats = run_prepare(cfg)
    short = load_prepared(tmp_path / "out")[0][0]
    assert stats["tokens"] == cut == len(short["input_ids"]) == len(short["loss_mask"])
    assert short["input_ids"] == row["input_ids"][:cut] and short["loss_mask"] == row["loss_mask"][:cut]
    assert trained_runs(char_tokenizer(NO_SYSTEM), short["input_ids"], short["loss_mask"]) == [
        "Hello!<|im_end|>", "See y"]


def test_rows_longer_than_max_length_are_truncated_or_skipped_and_counted(tmp_path, model, capsys):
    """A row that fits exactly is untouched, longer rows are cut and counted in rows_truncated, and a
    row whose first assistant token lies past max_length is skipped as too_long."""
    rows = [
        [user("Hi"), assistant("Hello")],                                         # fits exactly
        [user("Hi"), assistant("Hello there, friend")],                           # cut in its answer
        [user("Hi"), assistant("Hello"), user("More?"), assistant("Sure thing")],  # cut before turn 2
        [user("x" * 300), assistant("late")],                                     # too_long
    ]
    full = run_prepare(config(tmp_path, model, rows=rows, max_length=0))
    assert full["rows_truncated"] == 0 and full["rows_kept"] == 4
    lengths = [len(r) for r in load_prepared(tmp_path / "out")[0]["input_ids"]]
    limit = lengths[0]
    assert lengths[1] > limit and lengths[2] > limit and lengths[3] > limit
    stats = run_prepare(config(tmp_path, model, rows=rows, max_length=limit, overwrite=True))
    assert stats["rows_kept"] == 3 and stats["rows_truncated"] == 2 and stats["skipped"]["too_long"] == 1
    assert stats["tokens"] == 3 * limit
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_truncated"] == 2
    out = capsys.readouterr().out
    assert f"2 kept row(s) truncated to max_length={limit} tokens" in out and "too_long 1" in out


def test_nothing_kept_is_an_error(tmp_path, model):
    with pytest.raises(PrepareError, match="no row could be prepared out of 2.*regenerate"):
        run_prepare(config(tmp_path, model, rows=[[user("a")], [user("b")]]))
    assert not (tmp_path / "out").exists()


def test_missing_chat_template_and_template_file(tmp_path):
    model = str(save_tokenizer(char_tokenizer(None), tmp_path / "model"))
    with pytest.raises(ValueError, match="--chat-template FILE"):
        run_prepare(config(tmp_path, model))
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    stats = run_prepare(config(tmp_path, model, chat_template=str(template)))
    assert stats["rows_kept"] == 3 and stats["skipped"]["template_error"] == 0  # CHATML allows system


def test_cli_prints_clean_errors(tmp_path, model, capsys):
    assert cli.main(["prepare", "--model", model, "--dataset", "no-such-dataset", "--out", str(tmp_path / "o")]) == 2
    assert "unknown dataset 'no-such-dataset'" in capsys.readouterr().err
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    argv = ["prepare", "--model", model, "--dataset", data, "--out", str(tmp_path / "o"), "--strict"]
    assert cli.main(argv) == 2
    assert "row 1: no_assistant_turn" in capsys.readouterr().err


def test_parallel_tokenising_matches_one_process(tmp_path, model):
    rows = [[user(f"Question {k}"), assistant(f"Answer {k}")] for k in range(1200)] + [[user("alone")]]
    one = run_prepare(config(tmp_path, model, rows=rows, num_proc=1))
    two = run_prepare(config(tmp_path, model, rows=rows, num_proc=2, overwrite=True))
    for key in ("rows_in", "rows_kept", "rows_truncated", "tokens", "trained_tokens", "skipped"):
        assert one[key] == two[key]
    assert two["rows_kept"] == 1200 and two["skipped"]["no_assistant_turn"] == 1


def test_worker_count():
    assert worker_count(4, 10) == 1  # small datasets: one process
    assert worker_count(4, 5000) == 4
    assert worker_count(0, 5000) >= 1


def test_load_prepared_validates_the_contract(tmp_path):
    folder = tmp_path / "bad"
    mismatched = {"input_ids": [[1, 2], [3, 4, 5]], "loss_mask": [[0, 1], [1, 1]]}
    datasets.Dataset.from_dict(mismatched).save_to_disk(str(folder))
    (folder / "stats.json").write_text("{}")
    with pytest.raises(PrepareError, match="row 1 has 3 input_ids but 2 loss_mask values"):
        load_prepared(folder)
    other = tmp_path / "other"
    datasets.Dataset.from_dict({"input_ids": [[1]]}).save_to_disk(str(other))
    (other / "stats.json").write_text("{}")
    with pytest.raises(PrepareError, match=r"missing column\(s\) \['loss_mask'\]"):
        load_prepared(other)
    twos = tmp_path / "twos"
    datasets.Dataset.from_dict({"input_ids": [[1]], "loss_mask": [[2]]}).save_to_disk(str(twos))
    (twos / "stats.json").write_text("{}")
    with pytest.raises(PrepareError, match="other than 0 and 1"):
        load_prepared(twos)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prepared(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no stats.json"):
        load_prepared(tmp_path / "empty")


def test_check_conversation_reasons_cover_all_names():
    reasons = {prepare.check_conversation(row)[0] for row in ROWS[1:6]}
    assert reasons == {"no_assistant_turn", "empty_content", "unknown_role", "non_string_content",
                       "consecutive_same_role"}
    assert prepare.check_conversation(GOOD) is None


def test_a_tokenizer_folder_without_config_or_weights_is_enough(tmp_path, model):
    """People prepare data where the weights are not: a folder with only the tokenizer files and
    its chat template gives the same rows as the full model folder; a folder without tokenizer
    files is an error naming it."""
    import shutil
    from pathlib import Path

    tokenizer_only = tmp_path / "tokenizer-only"
    shutil.copytree(model, tokenizer_only)
    (tokenizer_only / "config.json").unlink()
    assert not any(p.suffix in (".safetensors", ".bin") for p in Path(model).iterdir())
    run_prepare(config(tmp_path, model))
    run_prepare(config(tmp_path, str(tokenizer_only), out=str(tmp_path / "out2")))
    full, only = load_prepared(tmp_path / "out")[0], load_prepared(tmp_path / "out2")[0]
    assert len(full) == 2 and full["input_ids"] == only["input_ids"] and full["loss_mask"] == only["loss_mask"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty} has no tokenizer files"):
        run_prepare(config(tmp_path, str(empty), out=str(tmp_path / "out3")))
