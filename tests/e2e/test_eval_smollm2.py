"""`run_eval` on the packaged SmolLM2 with a random EAGLE-3 draft: two MT-bench prompts, both turns."""

import json

import pytest
import torch

from baldeagle.config import EvalConfig
from baldeagle.decode.evaluate import run_eval
from baldeagle.model.checkpoint import save_draft
from baldeagle.model.draft_config import draft_config_from_target
from baldeagle.model.eagle3 import Eagle3Draft
from baldeagle.model.vocab import build_draft_vocab
from baldeagle.targets import load_target

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


KEYS = {
    "acceptance_length", "per_position_acceptance", "tokens_per_second", "baseline_tokens_per_second",
    "prompt_lookup_tokens_per_second", "speedup", "speedup_vs_prompt_lookup", "outputs_match_baseline",
    "num_prompts", "new_tokens", "per_category", "settings",
}


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    target = load_target("smollm2")
    cfg = draft_config_from_target(target.config, "eagle3", draft_vocab_size=4096)
    torch.manual_seed(0)
    d2t, _, _ = build_draft_vocab(torch.randint(0, 100, (cfg.vocab_size,)), cfg.draft_vocab_size)
    folder = tmp_path_factory.mktemp("draft")
    save_draft(Eagle3Draft.from_target(target, cfg, d2t=d2t), folder)
    return folder


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_eval_on_mtbench_writes_results_and_matches_plain_decoding(random_draft, tmp_path, mode):
    out = tmp_path / "eval"
    cfg = EvalConfig(model="smollm2", draft=str(random_draft), out=str(out), prompts="mtbench", mode=mode,
                     limit=2, max_new_tokens=24, tree_depth=3, tree_topk=3, tree_total_tokens=8)
    result = run_eval(cfg)
    saved = json.loads((out / "eval.json").read_text())
    assert KEYS <= set(saved)
    assert saved["outputs_match_baseline"] is True
    assert saved["num_prompts"] == 2 and saved["num_turns"] == 4
    assert 1.0 <= saved["acceptance_length"] <= (4 if mode == "tree" else cfg.num_draft_tokens + 1)
    assert len(saved["per_position_acceptance"]) == (3 if mode == "tree" else cfg.num_draft_tokens)
    assert saved["settings"]["mode"] == mode and saved["settings"]["max_new_tokens"] == 24
    assert saved["tokens_per_second"] > 0 and saved["baseline_tokens_per_second"] > 0
    assert saved["prompt_lookup_tokens_per_second"] > 0
    assert set(saved["per_category"]) == {t["category"] for t in saved["turns"]}
    assert (out / "acceptance.png").stat().st_size > 1000
    assert result["new_tokens"] == saved["new_tokens"] > 0


def test_eval_refuses_a_draft_for_another_target(tmp_path):
    from transformers import LlamaConfig

    other = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=4, vocab_size=49152)
    cfg = draft_config_from_target(other, "eagle1")
    from baldeagle.model.eagle1 import Eagle1Draft

    save_draft(Eagle1Draft(cfg), tmp_path / "draft")
    with pytest.raises(ValueError, match="hidden size 64"):
        run_eval(EvalConfig(draft=str(tmp_path / "draft"), out=str(tmp_path / "eval"), limit=1))
