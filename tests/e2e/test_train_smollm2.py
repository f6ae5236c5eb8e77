"""A short EAGLE-3 training run on the packaged SmolLM2 learns: held-out loss falls, step-0 accuracy rises."""

import json

import pytest

from baldeagle.cli import main

pytestmark = pytest.mark.e2e


def test_short_run_lowers_heldout_loss_and_raises_accuracy(tmp_path):
    prepared, out = tmp_path / "prepared", tmp_path / "draft"
    assert main(["prepare", "--dataset", "chitchat", "--limit", "120", "--max-length", "192",
                 "--out", str(prepared)]) == 0
    assert main(["train", "--config", "src/baldeagle/configs/quickstart.yaml", f"data={prepared}", f"out={out}",
                 "ttt_steps=2", "draft_vocab_size=4096", "max_steps=30", "per_device_train_batch_size=2",
                 "max_length=192", "eval_fraction=0.1", "logging_steps=10", "learning_rate=2e-3"]) == 0
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    before, after = metrics["eval_before_training"], metrics["eval"]
    assert after["eval_loss"] < 0.8 * before["eval_loss"], (before, after)
    assert after["eval_acc_0"] > before["eval_acc_0"] + 0.05, (before, after)
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.yaml").is_file()
