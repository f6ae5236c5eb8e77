"""The `speculators` 0.9.0 peer draft (benchmarks/peer_speculators_draft.py, run in
`.venv-speculators`) becomes a BaldEagle draft that computes the peer's own logits at every TTT step,
so `baldeagle eval` scores it with the semantics speculators trained it with.

Trains the peer for two steps on a few chat rows with the packaged SmolLM2 target (~1 minute), then
runs the conversion and check of benchmarks/quickstart_vs_speculators.py. Skips without
`.venv-speculators` (bash benchmarks/setup_speculators_venv.sh).
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from baldeagle.serve import REPO_ROOT

pytestmark = pytest.mark.e2e

SPECULATORS_PYTHON = REPO_ROOT / ".venv-speculators" / "bin" / "python"
CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three colours.", "Red, green and blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Say hello in Spanish.", "Hola!"),
    ("What is 2 + 2?", "2 + 2 equals 4."),
]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    if not SPECULATORS_PYTHON.is_file():
        pytest.skip(f"{SPECULATORS_PYTHON} missing: run bash benchmarks/setup_speculators_venv.sh")
    from datasets import Dataset

    from baldeagle.targets import load_tokenizer, resolve_model

    root = tmp_path_factory.mktemp("peer")
    tokenizer = load_tokenizer("smollm2")
    ids, masks = [], []
    for question, answer in CHATS:  # loss mask: the assistant's answer and what closes it
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}])
        prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
        assert full[: len(prompt)] == prompt
        ids.append(full)
        masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
    Dataset.from_dict({"input_ids": ids, "loss_mask": masks}).save_to_disk(str(root / "prepared"))
    (root / "rows.json").write_text(json.dumps({"train": [0, 1, 2, 3], "eval": [4]}))
    out = root / "peer"  # the layout quickstart_vs_speculators.convert_peer reads: OUT/peer/...
    command = [str(SPECULATORS_PYTHON), str(REPO_ROOT / "benchmarks" / "peer_speculators_draft.py"),
               "--data", str(root / "prepared"), "--out", str(out), "--target", resolve_model("smollm2"),
               "--rows", str(root / "rows.json"), "--max-steps", "2", "--batch-size", "2", "--draft-vocab", "1024"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def comparison():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import quickstart_vs_speculators

    return quickstart_vs_speculators


def test_peer_trains_and_saves_the_standard_eagle3_layout(peer):
    result = json.loads((peer / "train.json").read_text())
    assert result["steps"] == 2 and result["stop_reason"] == "max steps"
    assert result["rows"] == {"train": 4, "held_out": 1, "reference_row": 4}
    config = json.loads((peer / "speculators" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert {k: config[k] for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")} == dict.fromkeys(
        ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"), False)
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert config["transformer_layer_config"]["layer_types"] == ["full_attention"]
    assert config["draft_vocab_size"] == 1024


def test_converted_peer_computes_the_peer_logits(peer, comparison):
    from baldeagle.model.checkpoint import load_draft

    converted, check = comparison.convert_peer(SimpleNamespace(tolerance=1e-3), peer.parent)
    assert check["ok"] and set(check["max_abs_logit_diff_per_step"]) == {0, 1, 2}
    assert all(v == 1.0 for v in check["top1_agreement_per_step"].values())
    draft = load_draft(converted)  # what `baldeagle eval --draft` reads
    assert draft.config.aux_layer_ids == [2, 15, 27] and draft.config.draft_vocab_size == 1024


def test_the_check_notices_a_different_layer(peer, comparison):
    """The same weights with the feature normed differently must fail the check (as a peer trained
    with speculators' norm_before_residual=True would)."""
    from safetensors.torch import load_file

    from baldeagle.export_load import load_exported

    draft = load_exported(peer / "speculators", target="smollm2").eval()
    with torch.no_grad():
        draft.midlayer.hidden_norm.weight.mul_(1.5)
    with pytest.raises(AssertionError, match="does not compute the peer's logits"):
        comparison.check_conversion(draft, load_file(str(peer / "reference.safetensors")), 1e-3)
