"""A reduced quickstart on the packaged SmolLM2 (a few minutes): every stage's output, a draft that
beats an untrained one on held-out MT-bench, exact outputs, and a second run that redoes nothing."""

import json

import pytest
import torch

from baldeagle.config import EvalConfig, QuickstartConfig, ScoreConfig
from baldeagle.data.prepare import load_prepared
from baldeagle.data.regenerate import read_done
from baldeagle.decode.cost import best_shape, settings_for
from baldeagle.decode.evaluate import run_eval
from baldeagle.decode.score import run_score
from baldeagle.export_check import check_export
from baldeagle.model.checkpoint import load_draft, save_draft
from baldeagle.model.eagle3 import Eagle3Draft
from baldeagle.data.regenerate import self_prompt_openings
from baldeagle.quickstart import run_quickstart
from baldeagle.targets import load_target, load_tokenizer

pytestmark = pytest.mark.e2e

REDUCED = dict(minutes=2.5, conversations=16, self_prompts=6, max_new_tokens=64, eval_prompts=3, eval_new_tokens=32,
               score_prompts=8, score_new_tokens=32, train_user_turns=True)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    return root, run_quickstart(QuickstartConfig(out=str(root), **REDUCED))


def test_every_stage_wrote_its_output(quickstart):
    root, result = quickstart
    rows = read_done(root / "data" / "regenerated.jsonl")
    assert len(rows) == result["regenerated"]["rows_total"] >= 10
    assert sum(r["id"].startswith("self:") for r in rows) >= 1 and sum(r["id"].startswith("chitchat:") for r in rows) >= 1
    assert all(m["role"] == "assistant" for r in rows for m in r["messages"][1::2])
    prompts = read_done(root / "data" / "regenerated.jsonl.self_prompts.jsonl")  # steered by default
    assert prompts and all(p["prompt"].startswith(tuple(self_prompt_openings("tasks"))) for p in prompts)
    assert json.loads((root / "prepared" / "stats.json").read_text())["train_user_turns"] is True
    prepared, _ = load_prepared(root / "prepared")
    tokenizer = load_tokenizer("smollm2")
    first = prepared[0]
    starts = [k for k, m in enumerate(first["loss_mask"]) if m and not (k and first["loss_mask"][k - 1])]
    # train_user_turns reaches prepare: the row's first trained run is its first user turn's words.
    first_run_end = first["loss_mask"].index(0, starts[0])
    first_prompts = {r["messages"][0]["content"] + "<|im_end|>" for r in rows if r["messages"][0]["role"] == "user"}
    assert tokenizer.decode(first["input_ids"][starts[0]:first_run_end]) in first_prompts
    assert (root / "mask.html").stat().st_size > 0
    draft = load_draft(root / "draft")
    assert draft.config.draft_type == "eagle3" and result["train"]["steps"] >= 1
    for out in (root / "eval", root / "eval" / "chain"):
        saved = json.loads((out / "eval.json").read_text())
        assert saved["outputs_match_baseline"] is True and saved["num_prompts"] == REDUCED["eval_prompts"]
        assert (out / "acceptance.png").is_file()
    for fmt in ("vllm", "sglang", "speculators"):
        assert check_export(root / "export" / fmt, load_target("smollm2").config) == []
        assert "serve" in (root / "export" / fmt / "README.md").read_text()
    score = json.loads((root / "score" / "score.json").read_text())
    assert score["num_prompts"] == REDUCED["score_prompts"] and len(score["per_category"]) == 8
    assert result["score"]["acceptance_length"] == score["acceptance_length"] >= 1.0
    assert "yardstick" in (root / "summary.md").read_text()
    assert (root / "summary.md").read_text().count("|") > 10
    assert set(result["eval"]) == {"tree", "chain"}


def test_trained_draft_beats_an_untrained_one(quickstart, tmp_path):
    """The same evaluator, settings and prompts, for the trained draft and a fresh one (the
    starting point of training: random layers, the target's LM head rows) with the same vocabulary."""
    root, result = quickstart
    trained = load_draft(root / "draft")
    torch.manual_seed(0)
    fresh = Eagle3Draft.from_target(load_target("smollm2"), trained.config, d2t=trained.d2t.clone())
    save_draft(fresh, tmp_path / "fresh")
    chain = json.loads((root / "eval" / "chain" / "eval.json").read_text())
    settings = {k: chain["settings"][k] for k in ("limit", "first_turn_only", "max_new_tokens", "prompt_lookup")}
    choice = chain["shape_choice"]  # the quickstart's chain shape comes from its cost model
    best = best_shape(choice["predicted"])
    assert (choice["shape"], choice["drafted"]) == (best["shape"], best["drafted"])
    shape = settings_for(best)  # decoded as chosen: a chain of k, a fan (depth 1) or a depth-2 tree
    expected = ([shape["num_draft_tokens"], 1, shape["num_draft_tokens"] + 1] if shape["mode"] == "chain"
                else [shape["tree_depth"], shape["tree_topk"], shape["tree_total_tokens"]])
    assert chain["settings"]["tree_shape"] == expected
    summary_md = (root / "summary.md").read_text()
    assert result["eval"]["chain"]["shape"] == choice["chosen"] and choice["chosen"] in summary_md
    lookup = result["eval"]["chain"]["prompt_lookup_tokens_per_second"]  # timed beside the chosen shape
    assert lookup > 0 and f"prompt lookup decoding (no draft): {lookup:.1f}" in summary_md
    baseline = run_eval(EvalConfig(draft=str(tmp_path / "fresh"), out=str(tmp_path / "eval"), **settings,
                                   **settings_for(best)))
    print(f"acceptance length, {choice['chosen']}: trained {chain['acceptance_length']:.3f}, "
          f"untrained {baseline['acceptance_length']:.3f}")
    assert chain["acceptance_length"] > baseline["acceptance_length"]
    # the yardstick ranks them the same way, on its own cached answers
    fresh_score = run_score(ScoreConfig(draft=str(tmp_path / "fresh"), out=str(tmp_path / "score"),
                                        limit=REDUCED["score_prompts"], max_new_tokens=REDUCED["score_new_tokens"]))
    assert result["score"]["acceptance_length"] > fresh_score["acceptance_length"]
    assert result["eval"]["tree"]["acceptance_length"] > 1.0


def test_a_second_run_redoes_nothing(quickstart):
    root, first = quickstart
    again = run_quickstart(QuickstartConfig(out=str(root), **REDUCED))
    assert all(seconds == 0 for seconds in again["seconds"].values())
    assert again["eval"] == first["eval"]


def test_a_budget_too_small_to_train_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        run_quickstart(QuickstartConfig(out=str(tmp_path / "qs"), minutes=0.5))
    assert not (tmp_path / "qs").exists()
