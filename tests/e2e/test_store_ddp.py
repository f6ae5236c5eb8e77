"""`baldeagle features` under torchrun: 2 CPU processes write the same store as one process."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from baldeagle.data.store_reader import FeatureStore

pytestmark = pytest.mark.e2e


def features(args, out, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    stage = ["-m", "baldeagle.cli", "features", *args, "--out", str(out)]
    command = (launcher if nproc > 1 else [sys.executable]) + stage
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default; the same in both runs
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_processes_write_the_single_process_store(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=6, vocab_size=256, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    lengths = torch.randint(1, 60, (40,)).tolist()
    rows = [torch.randint(3, 256, (n,)).tolist() for n in lengths]
    datasets.Dataset.from_dict({"input_ids": rows, "loss_mask": [[1] * n for n in lengths]}).save_to_disk(
        tmp_path / "prepared")
    (tmp_path / "prepared" / "stats.json").write_text("{}")
    args = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "prepared"), "--draft-type", "eagle3",
            "--batch-tokens", "128", "--shard-tokens", "300"]

    features(args, tmp_path / "one", nproc=1)
    two_run = features(args, tmp_path / "two", nproc=2)

    one, two = FeatureStore(tmp_path / "one"), FeatureStore(tmp_path / "two")
    shards = [entry["file"] for entry in one.manifest["shards"]]
    assert f"wrote {(len(shards) + 1) // 2} shards on rank 0" in two_run.stderr  # shard i → rank i % 2
    assert "on rank 1" not in two_run.stderr  # progress from the main process only
    assert len(shards) >= 4 and shards == [entry["file"] for entry in two.manifest["shards"]]
    for name in shards:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    strip = lambda m: {k: v for k, v in m.items() if k != "provenance"}  # noqa: E731
    assert strip(one.manifest) == strip(two.manifest)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["rows"] == 40
    assert sorted(os.listdir(tmp_path / "two")) == sorted(["config.yaml", "manifest.json", *shards])
