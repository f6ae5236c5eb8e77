"""DDP with 2 CPU processes (gloo, through torchrun) follows the same loss trajectory as one process
with the same global batch (1 row × 2 processes vs 1 row × 2 accumulation steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baldeagle.config import TrainConfig
from baldeagle.train.run import run_train
from train_fixtures import save_prepared, save_tiny_target

pytestmark = pytest.mark.e2e

SETTINGS = ["ttt_steps=2", "draft_vocab_size=128", "learning_rate=3e-3", "warmup_steps=0", "max_steps=5",
            "per_device_train_batch_size=1", "logging_steps=1", "save_steps=1000", "eval_fraction=0",
            "max_length=64", "train_sampling_strategy=sequential"]


def trajectory(out: Path) -> list[float]:
    history = json.loads((out / "final" / "metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_two_process_ddp_matches_one_process(tmp_path):
    model = save_tiny_target(tmp_path / "target")
    data = save_prepared(tmp_path / "prepared")
    common = [f"model={model}", f"data={data}", *SETTINGS]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "baldeagle.cli", "train", *common, f"out={tmp_path / 'ddp'}"],
        check=True, env=env, timeout=600,
    )
    from baldeagle.cli import parse_config

    _, cfg = parse_config(["train", *common, f"out={tmp_path / 'single'}", "gradient_accumulation_steps=2"])
    assert isinstance(cfg, TrainConfig)
    run_train(cfg)
    ddp, single = trajectory(tmp_path / "ddp"), trajectory(tmp_path / "single")
    assert len(ddp) == len(single) == 5
    # Tolerance: float32 sums in a different order (gloo all-reduce vs accumulation).
    assert ddp == pytest.approx(single, rel=1e-4), (ddp, single)
    # The trained weights agree too, so both processes applied the same synchronised updates.
    from baldeagle.model.checkpoint import load_draft

    a, b = load_draft(tmp_path / "ddp" / "final"), load_draft(tmp_path / "single" / "final")
    for name, value in a.trainable_parameters().items():
        assert value.detach().allclose(b.trainable_parameters()[name].detach(), atol=1e-5), name
