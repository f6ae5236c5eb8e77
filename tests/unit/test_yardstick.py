"""The yardstick: teacher-forced chain acceptance on cached target answers.

Checked against hand-computed counts, and against real chain decoding (`speculative_generate`):
walking the yardstick's accepted runs gives exactly the accepted counts decoding measured, step by
step. The answer cache is reused, rebuilt when what it depends on changes, and refused when a
named cache was made for something else."""

import json
import logging

import pytest
import torch
from tiny_chat import char_tokenizer
from tiny_targets import random_prompts, tiny_target, train_tiny_draft

from baldeagle.decode.speculative import SpecSettings, plain_generate, speculative_generate
from baldeagle.decode.yardstick import (
    LOOKAHEAD,
    Answer,
    Yardstick,
    YardstickSettings,
    accepted_runs,
    build_yardstick,
    chain_walk,
    depth2_accepted,
)
from baldeagle.model.draft_config import draft_config_from_target


def test_accepted_runs_count_the_leading_right_guesses():
    tokens = torch.tensor([5, 6, 7, 8, 9, 10])
    # step k at row t guesses x_{t+2+k}
    guesses = torch.tensor([
        [7, 0, 9, 10, -1, -1],  # step 0: rows 0, 2, 3 right
        [8, 9, 0, 11, -1, -1],  # step 1: rows 0, 1 right (row 3 would need x_6, past the end)
        [9, 0, 0, 0, -1, -1],  # step 2: row 0 right
    ])
    assert accepted_runs(guesses, tokens).tolist() == [3, 0, 1, 1, 0, 0]


def test_chain_walk_steps_like_chain_decoding():
    prompt, answer = 3, [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    # runs[r] for rows 0..12; chains start at row prompt-1 = 2
    runs = [0, 0, 2, 0, 0, 1, 0, 0, 3, 0, 0, 0, 0]
    # row 2: accept 2 (emits answer[1..3]) → row 5: accept 1 (answer[4..5]) → row 7: 0 (answer[6])
    # → row 8: accept 3 (answer[7..10]), cut at max_new_tokens=10
    assert chain_walk(runs, prompt, answer, 10, set()) == [2, 1, 0, 3]
    assert chain_walk(runs, prompt, answer, 4, set()) == [2]  # 1 + 3 tokens emitted: done
    assert chain_walk(runs, prompt, answer, 10, {24}) == [2, 1]  # the stop token 24 ends it
    assert chain_walk(runs, prompt, [29], 10, {29}) == []  # the first token is already a stop


def test_runs_past_a_stop_token_are_cut_at_the_answer_end():
    # the answer ends (stop token 9) at index 2; a chain at row 1 guessing past it counts only to the end
    answer = Answer("0", "c", [1, 2], [7, 8, 9])
    tokens = torch.tensor(answer.prompt + answer.answer)
    guesses = torch.tensor([[0, 8, 0, -1, -1], [0, 9, -1, -1, -1], [0, 5, -1, -1, -1]])
    assert accepted_runs(guesses, tokens).tolist() == [0, 2, 0, 0, 0]


def _answers_and_features(target, draft, prompts, length):
    answers, features = [], []
    for i, ids in enumerate(prompts):
        tokens = plain_generate(target, ids, SpecSettings(max_new_tokens=length + LOOKAHEAD)).tokens
        answers.append(Answer(str(i), "all", ids[0].tolist(), tokens))
        with torch.no_grad():
            hidden = target(torch.tensor([ids[0].tolist() + tokens]), output_hidden_states=True).hidden_states
        if draft.config.draft_type == "eagle3":
            features.append(torch.cat([hidden[j] for j in draft.config.aux_layer_ids], dim=-1)[0])
        else:
            features.append(hidden[-1][0])
    return answers, features


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
@pytest.mark.parametrize("k", [1, 3])
def test_walk_equals_chain_decoding_step_for_step(draft_type, k):
    target = tiny_target("llama")
    draft = train_tiny_draft(target, draft_type)
    prompts, length = random_prompts(6, seed=11), 40  # prompts it was trained on: long accepted runs
    answers, features = _answers_and_features(target, draft, prompts, length)
    stick = Yardstick(answers, features, length, stop=())
    accepted_total = 0
    for ids, item, runs in zip(prompts, answers, stick.runs(draft, k, batch_size=4)):
        decoded = speculative_generate(target, draft, ids, SpecSettings(mode="chain", num_draft_tokens=k,
                                                                         max_new_tokens=length))
        assert chain_walk(runs, len(item.prompt), item.answer, length, set()) == decoded.accepted
        accepted_total += sum(decoded.accepted)
    assert accepted_total > 40  # long runs were exercised, not only rejections
    result = stick.score(draft, k)
    steps = [s for ids in prompts for s in speculative_generate(
        target, draft, ids, SpecSettings(mode="chain", num_draft_tokens=k, max_new_tokens=length)).accepted]
    assert result["acceptance_length"] == pytest.approx(1 + sum(steps) / len(steps))
    assert result["per_position_acceptance"] == pytest.approx([sum(s > i for s in steps) / len(steps)
                                                               for i in range(k)])


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_fan_walk_equals_depth_one_tree_decoding_step_for_step(draft_type):
    """A fan of w first guesses, walked through the answer, accepts exactly what tree decoding with
    depth 1 and top-w accepts; width 1 is chain k = 1."""
    target = tiny_target("llama")
    draft = train_tiny_draft(target, draft_type, steps=50)  # half-trained: the 2nd and 3rd guesses matter
    prompts, length = random_prompts(6, seed=11), 40
    answers, features = _answers_and_features(target, draft, prompts, length)
    stick = Yardstick(answers, features, length, stop=())
    ranks = stick.fan_ranks(draft, 3, batch_size=4)
    taus = stick.fan_acceptance_lengths(draft, 3, batch_size=4)
    for width in (1, 2, 3):
        settings = SpecSettings(mode="tree", tree_depth=1, tree_topk=width, tree_total_tokens=width + 1,
                                max_new_tokens=length)
        steps = []
        for ids, item, rank in zip(prompts, answers, ranks):
            decoded = speculative_generate(target, draft, ids, settings).accepted
            assert chain_walk([int(0 <= r < width) for r in rank], len(item.prompt), item.answer, length,
                              set()) == decoded
            steps += decoded
        assert taus[width - 1] == pytest.approx(1 + sum(steps) / len(steps))
    assert taus[0] < taus[1] < taus[2]  # the wider fans accepted more: ranks 1 and 2 were exercised
    assert taus[0] == pytest.approx(stick.score(draft, 1)["acceptance_length"])


EAGLE31 = [dict(fc_norm=True, feed_normed_hidden=True), dict(norm_before_fc=True, feed_normed_hidden=True)]


@pytest.mark.parametrize("options", EAGLE31, ids=lambda o: "+".join(o))
def test_walk_equals_chain_decoding_with_eagle31_options(options):
    """The training path (TTT's rollout, which the yardstick reuses) and the decoding path agree on
    a draft that feeds its post-norm state to the next step, step for step."""
    target = tiny_target("llama")
    draft = train_tiny_draft(target, "eagle3", **options)
    prompts, length, k = random_prompts(6, seed=11), 40, 3
    answers, features = _answers_and_features(target, draft, prompts, length)
    stick = Yardstick(answers, features, length, stop=())
    decoded = [speculative_generate(target, draft, ids, SpecSettings(mode="chain", num_draft_tokens=k,
                                                                     max_new_tokens=length)).accepted
               for ids in prompts]
    for item, runs, accepted in zip(answers, stick.runs(draft, k, batch_size=4), decoded):
        assert chain_walk(runs, len(item.prompt), item.answer, length, set()) == accepted
    assert sum(a >= 2 for steps in decoded for a in steps) > 5  # later steps, which read the fed-back state, ran


def test_batching_does_not_change_the_runs():
    target = tiny_target("llama")
    draft = train_tiny_draft(target, "eagle3", steps=50)
    answers, features = _answers_and_features(target, draft, random_prompts(5, seed=3), 20)
    stick = Yardstick(answers, features, 20, stop=())
    assert stick.runs(draft, 3, batch_size=1) == stick.runs(draft, 3, batch_size=5)


# ------------------------------------------------------------------------------------------
# The answer cache and the stage, on a tiny target saved as a folder
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("yardstick")
    tokenizer = char_tokenizer()
    for name, seed in (("target", 0), ("other", 1)):
        tiny_target("llama", seed=seed, max_position_embeddings=512).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    prompts = [{"turns": [text], "category": cat} for text, cat in
               (("Hi there", "chat"), ("2+2?", "math"), ("Tell me a story", "chat"))]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALDEAGLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _build(saved, model="target", **settings):
    target_dir = str(saved / model)  # a name under `saved`, or an absolute path
    from baldeagle.targets import load_target

    config = draft_config_from_target(load_target(target_dir).config, "eagle3", 64)
    options = {"prompts": str(saved / "prompts.jsonl"), "max_new_tokens": 12, **settings}
    return build_yardstick(target_dir, config, YardstickSettings(**options))


def test_answers_are_cached_and_rebuilt_when_an_input_changes(saved, cache, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="baldeagle")
    first = _build(saved)
    assert "answers 3 prompts once" in caplog.text
    caplog.clear()
    again = _build(saved)
    assert "prompts once" not in caplog.text  # reused, not generated again
    assert again.folder == first.folder and [a.answer for a in again.answers] == [a.answer for a in first.answers]
    for item in first.answers:
        assert len(item.answer) == 12 + LOOKAHEAD or item.answer[-1] in first.stop
        assert all(torch.equal(f, g) for f, g in zip(first.features, again.features))
    # another length, another target, other prompts, another template: each a new answer set
    folders = {first.folder, _build(saved, max_new_tokens=13).folder, _build(saved, "other").folder,
               _build(saved, limit=2).folder}
    template = tmp_path / "templated"
    import shutil

    shutil.copytree(saved / "target", template)
    config = json.loads((template / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    (template / "tokenizer_config.json").write_text(json.dumps(config))
    (template / "chat_template.jinja").unlink(missing_ok=True)
    folders.add(_build(saved, template).folder)
    assert len(folders) == 5
    assert caplog.text.count("prompts once") == 4


def test_a_named_cache_from_another_target_or_length_is_refused(saved, cache):
    made = _build(saved).folder
    with pytest.raises(ValueError, match="another target"):
        _build(saved, "other", answers=str(made))
    with pytest.raises(ValueError, match="another answer length"):
        _build(saved, answers=str(made), max_new_tokens=5)


def test_a_prompt_set_without_a_usable_prompt_is_refused(saved, cache, tmp_path):
    with pytest.raises(ValueError, match="no usable prompt"):
        _build(saved, max_new_tokens=600)  # no prompt fits the 512-token context with its answer
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        _build(saved, prompts=str(empty))


def test_training_logs_the_yardstick_and_score_agrees(saved, cache, tmp_path):
    from train_fixtures import save_prepared

    from baldeagle.cli import main
    from baldeagle.config import TrainConfig
    from baldeagle.train.run import run_train

    data = save_prepared(tmp_path / "prepared", rows=12, length=40, vocab=60)
    prompts = str(saved / "prompts.jsonl")
    cfg = TrainConfig(model=str(saved / "target"), data=str(data), out=str(tmp_path / "train"), ttt_steps=2,
                      draft_vocab_size=32, max_steps=3, per_device_train_batch_size=4, eval_fraction=0.0,
                      max_length=48, eval_prompts=prompts, eval_prompts_new_tokens=16, eval_chain_k=2,
                      logging_steps=1, save_steps=1000, eval_steps=2)
    metrics = run_train(cfg)
    assert 1.0 <= metrics["eval_prompts_tau"] <= 3.0
    assert {"eval_prompts_tau_chat", "eval_prompts_tau_math", "eval_prompts_acc_pos2"} <= set(metrics)
    saved_metrics = json.loads((tmp_path / "train" / "final" / "metrics.json").read_text())
    assert "eval_prompts_tau" in saved_metrics["eval_before_training"]
    # the learning-curve axes: the target read every row of the one epoch once (12 rows, 408 tokens)
    logged = [h for h in saved_metrics["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3] and logged[-1]["target_tokens"] == 3 * (40 + 36 + 32 + 28)
    assert 0 < logged[0]["train_minutes"] <= logged[-1]["train_minutes"]
    # eval_steps=2 without a held-out split: the yardstick's own schedule scored step 2, then the end
    # (the score before training is in eval_before_training)
    assert [h["step"] for h in saved_metrics["log_history"] if "eval_prompts_tau" in h] == [2, 3]
    # the stage on the saved draft scores the same answers with the same features: the same number
    assert main(["score", "--model", str(saved / "target"), "--draft", str(tmp_path / "train" / "final"),
                 "--prompts", prompts, "--max-new-tokens", "16", "--num-draft-tokens", "2",
                 "--out", str(tmp_path / "score")]) == 0
    result = json.loads((tmp_path / "score" / "score.json").read_text())
    assert result["acceptance_length"] == pytest.approx(metrics["eval_prompts_tau"])
    fans = [metrics[f"eval_prompts_fan_tau_w{w}"] for w in range(1, 9)]
    assert result["fan_acceptance_length"] == pytest.approx(fans)
    assert result["num_prompts"] == 3 and set(result["per_category"]) == {"chat", "math"}


@pytest.mark.parametrize("option, message", [("--num-draft-tokens=9", "num_draft_tokens"),
                                             ("--max-new-tokens=1", "max_new_tokens"),
                                             ("--target-dtype=int8", "target_dtype")])
def test_score_refuses_bad_settings_before_loading(option, message, capsys, tmp_path):
    from baldeagle.cli import main

    assert main(["score", "--draft", str(tmp_path / "missing"), option]) == 2
    assert message in capsys.readouterr().err


def test_depth2_accepted_keeps_the_best_nodes_like_grow_tree():
    """Hand-computed: two rows, topk 2. Row 0's best child (of first guess 0) outscores first guess 1."""
    first_ids = torch.tensor([[10, 11], [20, 21]])
    first_logp = torch.tensor([[-0.1, -3.0], [-0.5, -1.0]])
    child_ids = torch.tensor([[[12, 13], [14, 15]], [[22, 23], [24, 25]]])
    child_logp = torch.tensor([[[-0.2, -4.0], [-0.1, -0.2]], [[-2.0, -3.0], [-0.1, -0.2]]])
    # Scores row 0: first 10:-0.1 11:-3.0, children 12:-0.3 13:-4.1 14:-3.1 15:-3.2.
    # Scores row 1: first 20:-0.5 21:-1.0, children 22:-2.5 23:-3.5 24:-1.1 25:-1.2.
    nxt1, nxt2 = torch.tensor([10, 21]), torch.tensor([12, 24])
    accepted = lambda total: depth2_accepted(first_ids, first_logp, child_ids, child_logp, nxt1, nxt2, 2, total)
    assert accepted(2).tolist() == [1, 0]  # one node: 10 in row 0 (12 not kept), 20 in row 1
    assert accepted(3).tolist() == [2, 1]  # row 0 keeps 10, 12; row 1 keeps 20, 21
    assert accepted(4).tolist() == [2, 2]  # row 1 now keeps 24 (-1.1)
    other = lambda total: depth2_accepted(first_ids, first_logp, child_ids, child_logp, torch.tensor([11, 21]),
                                          torch.tensor([14, 24]), 2, total)[0].item()
    assert [other(total) for total in (3, 4, 5)] == [0, 1, 2]  # 11 (-3.0) is kept third, its child 14 (-3.1) fourth


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_depth2_walk_equals_depth2_tree_decoding_step_for_step(draft_type):
    """Each depth-2 tree (topk first guesses, the best total - 1 nodes), walked through the answer,
    accepts exactly what tree decoding with depth 2 accepts."""
    target = tiny_target("llama")
    draft = train_tiny_draft(target, draft_type, steps=50)  # half-trained: later guesses and children matter
    prompts, length = random_prompts(6, seed=11), 40
    answers, features = _answers_and_features(target, draft, prompts, length)
    stick = Yardstick(answers, features, length, stop=())
    shapes = [(2, 4), (3, 5), (3, 7)]
    runs = stick.depth2_runs(draft, shapes, batch_size=4)
    taus = {(t["topk"], t["total_tokens"]): t["tau"] for t in stick.depth2_acceptance_lengths(draft, shapes, 4)}
    twos = 0
    for topk, total in shapes:
        settings = SpecSettings(mode="tree", tree_depth=2, tree_topk=topk, tree_total_tokens=total,
                                max_new_tokens=length)
        steps = []
        for ids, item, accepted in zip(prompts, answers, runs[(topk, total)]):
            decoded = speculative_generate(target, draft, ids, settings).accepted
            assert chain_walk(accepted, len(item.prompt), item.answer, length, set()) == decoded
            steps += decoded
        twos += sum(s == 2 for s in steps)
        assert taus[(topk, total)] == pytest.approx(1 + sum(steps) / len(steps))
    assert twos > 5  # second guesses were accepted, not only first ones
