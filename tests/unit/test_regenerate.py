"""`regenerate` on a tiny saved target: answers equal the target's own greedy `generate`, turn by turn;
resume after a kill neither duplicates nor loses rows; bad rows are counted; self-written prompts."""

import json
from collections import Counter

import pytest
from tiny_chat import char_tokenizer
from tiny_targets import tiny_target

from baldeagle.config import PrepareConfig, RegenerateConfig
from baldeagle.data.prepare import load_prepared, run_prepare
from baldeagle.data.generation import HFGenerator, Sampling
from baldeagle.data.regenerate import conversations_from, open_user_turn, read_done, run_regenerate

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "old answer"},
                  {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "old"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
    {"messages": [{"role": "assistant", "content": "no user turn here"}]},
    {"messages": [{"role": "user", "content": "Tell me a story about a cat"}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                  {"role": "user", "content": "Why?"}, {"role": "user", "content": "Really?"}]},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("regen")
    tokenizer = char_tokenizer()
    target = tiny_target("llama", max_position_embeddings=512)
    target.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONS))
    return root, target, tokenizer


def config(saved, out, **overrides):
    root, _, _ = saved
    return RegenerateConfig(**{"model": str(root / "target"), "dataset": str(root / "chats.jsonl"), "out": str(out),
                               "max_new_tokens": 10, "batch_size": 3, "chunk_size": 2, **overrides})


def reference_answer(target, tokenizer, messages) -> str:
    """The target's own greedy answer, one prompt at a time (no padding, no batching)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = target.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=target.generation_config.eos_token_id,
                          pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_answers_are_the_targets_greedy_answers_turn_by_turn(saved, tmp_path):
    _, target, tokenizer = saved
    stats = run_regenerate(config(saved, tmp_path / "out.jsonl"))
    rows = {r["id"]: r["messages"] for r in read_done(tmp_path / "out.jsonl")}
    assert sorted(rows) == ["chats.jsonl:0", "chats.jsonl:1", "chats.jsonl:3", "chats.jsonl:4"]
    assert stats["skipped"] == {"no_user_turn": 1} and stats["rows_total"] == 4
    for messages in rows.values():
        history = []
        for message in messages:
            if message["role"] == "assistant":  # each answer is the target's greedy answer to what precedes it
                assert message["content"] == reference_answer(target, tokenizer, history)
            history.append(message)
    # user turns (and the system message) are kept in order; the old answers are gone
    assert [m["content"] for m in rows["chats.jsonl:0"] if m["role"] == "user"] == ["Hi there", "And then?"]
    assert "old answer" not in json.dumps(rows["chats.jsonl:0"])
    assert rows["chats.jsonl:1"][0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in rows["chats.jsonl:4"]] == ["user", "assistant"] * 3
    assert stats["answers"] == 7 and stats["generated_tokens"] > 0


def test_output_is_what_prepare_reads(saved, tmp_path):
    root, _, _ = saved
    run_regenerate(config(saved, tmp_path / "out.jsonl", max_turns=1))
    stats = run_prepare(PrepareConfig(model=str(root / "target"), dataset=str(tmp_path / "out.jsonl"),
                                      out=str(tmp_path / "prepared"), num_proc=1))
    dataset, _ = load_prepared(tmp_path / "prepared")
    assert len(dataset) == 4 and stats["rows_kept"] == 4
    assert all(sum(row["loss_mask"]) > 0 for row in dataset)


def test_resume_after_a_kill_neither_duplicates_nor_loses_rows(saved, tmp_path):
    full = tmp_path / "full.jsonl"
    run_regenerate(config(saved, full))
    expected = full.read_text().splitlines()
    # A kill after the first chunk, in the middle of writing the second: one full line, one cut line.
    killed = tmp_path / "killed.jsonl"
    killed.write_text(expected[0] + "\n" + expected[1][: len(expected[1]) // 2])
    stats = run_regenerate(config(saved, killed))
    assert killed.read_text().splitlines() == [expected[0], *expected[1:]]
    assert stats["rows_already_done"] == 1 and stats["rows_written_this_run"] == 3
    # A second complete run finds everything done and writes nothing.
    again = run_regenerate(config(saved, killed))
    assert again["rows_written_this_run"] == 0 and killed.read_text().splitlines() == expected


def test_time_budget_stops_after_a_chunk_and_a_later_run_finishes(saved, tmp_path):
    out = tmp_path / "out.jsonl"
    stats = run_regenerate(config(saved, out, max_minutes=1e-6))
    assert stats["rows_written_this_run"] == 2 and stats["rows_left"] == 2  # chunk_size 2, of 4 answerable
    stats = run_regenerate(config(saved, out))
    assert stats["rows_total"] == 4 and stats["rows_already_done"] == 2 and stats["rows_left"] == 0


def test_self_written_prompts_are_distinct_and_answered(saved, tmp_path):
    out = tmp_path / "self.jsonl"
    stats = run_regenerate(config(saved, out, dataset="", self_prompts=3, self_prompt_max_tokens=64,
                                  self_prompt_temperature=1.5, batch_size=8))
    prompts = read_done(out.with_name("self.jsonl.self_prompts.jsonl"))
    texts = [p["prompt"] for p in prompts]
    assert len(texts) == 3 and len(set(texts)) == 3 and all(len(t) >= 10 for t in texts)
    rows = read_done(out)
    assert stats["self_prompts"] == 3 and sorted(r["id"] for r in rows) == ["self:0", "self:1", "self:2"]
    assert {r["messages"][0]["content"] for r in rows} == set(texts)


def test_self_written_prompts_continue_the_openings_in_turn(saved, tmp_path):
    openings = tmp_path / "openings.txt"
    openings.write_text("Write code that\n\nSolve for x:\n")
    out = tmp_path / "steered.jsonl"
    run_regenerate(config(saved, out, dataset="", self_prompts=4, self_prompt_max_tokens=64,
                          self_prompt_temperature=1.5, batch_size=8, self_prompt_openings=str(openings)))
    texts = [p["prompt"] for p in read_done(out.with_name("steered.jsonl.self_prompts.jsonl"))]
    starts = [next((o for o in ("Write code that", "Solve for x:") if t.startswith(o)), None) for t in texts]
    assert len(texts) == 4 and None not in starts and set(starts) == {"Write code that", "Solve for x:"}
    assert all(len(t) - len(o) >= 3 for t, o in zip(texts, starts))  # the target wrote the rest
    assert {r["messages"][0]["content"] for r in read_done(out)} == set(texts)


def test_task_openings_cycle_over_kinds():
    from baldeagle.data.regenerate import TASK_OPENINGS, self_prompt_openings

    openings = self_prompt_openings("tasks")
    kinds = len(TASK_OPENINGS)
    assert openings[:kinds] == [group[0] for group in TASK_OPENINGS.values()]  # one kind after another
    assert sorted(openings) == sorted(o for group in TASK_OPENINGS.values() for o in group)


@pytest.mark.parametrize("overrides, message", [
    ({"self_prompts": 2, "self_prompt_openings": "no/such/openings.txt"}, "neither 'tasks' nor a file"),
    ({"dataset": "", "self_prompts": 0}, "nothing to regenerate"),
    ({"top_p": 0.0}, "top_p"),
    ({"batch_size": 0}, "batch_size"),
    ({"backend": "tgi"}, "backend"),
])
def test_bad_settings_are_refused(saved, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_regenerate(config(saved, tmp_path / "out.jsonl", **overrides))


def test_a_dataset_without_a_usable_prompt_is_refused(saved, tmp_path):
    data = tmp_path / "none.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "only an answer"}]}) + "\n")
    with pytest.raises(ValueError, match="no conversation has a user turn"):
        run_regenerate(config(saved, tmp_path / "out.jsonl", dataset=str(data)))
    assert not (tmp_path / "out.jsonl").exists()


def test_a_garbled_output_file_is_named(saved, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "messages": []}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        run_regenerate(config(saved, out))


def test_sampling_is_reproducible(saved, tmp_path):
    first = run_regenerate(config(saved, tmp_path / "a.jsonl", temperature=1.0, top_p=0.9, max_turns=1))
    second = run_regenerate(config(saved, tmp_path / "b.jsonl", temperature=1.0, top_p=0.9, max_turns=1))
    assert first["answers"] == second["answers"]
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_a_sampled_batch_can_stop_once_most_rows_are_finished(saved):
    """finish_fraction < 1 ends the batch at the step where that share of rows has finished: the
    finished rows are exactly those of the full run (same seed), the others are cut prefixes of it."""
    root, _, tokenizer = saved
    generator = HFGenerator(str(root / "target"), batch_size=16)
    prompts = [open_user_turn(tokenizer, "")] * 16  # what self-prompt sampling generates from
    full = generator(prompts, Sampling(max_new_tokens=60, temperature=1.5, top_p=0.95, seed=3))
    early = generator(prompts, Sampling(max_new_tokens=60, temperature=1.5, top_p=0.95, seed=3, finish_fraction=0.25))
    ends = sorted(len(c.tokens) + 1 for c in full if c.finished)  # the step that produced each stop token
    assert len(ends) >= 4 and ends[3] < max(len(c.tokens) for c in full), "the test needs rows that end late"
    assert sum(c.finished for c in early) >= 4
    for short, whole in zip(early, full):
        if short.finished:
            assert short == whole
        else:
            assert len(short.tokens) == ends[3] and whole.tokens[:ends[3]] == short.tokens


def test_malformed_lines_are_counted_as_skipped(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(CONVERSATIONS[0]) + "\n{broken\n" + json.dumps(CONVERSATIONS[0]) + "\n")
    skipped = Counter()
    conversations = conversations_from(RegenerateConfig(dataset=str(data), out=str(tmp_path / "o.jsonl")), skipped)
    assert len(conversations) == 2 and skipped == Counter({"malformed_line": 1})
