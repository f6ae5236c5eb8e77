"""Online target features equal what the full target computes (a second path through Transformers)."""

import pytest
import torch

from baldeagle.data.features import OnlineFeatures
from tiny_targets import tiny_target


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral"])
def test_online_features_match_the_full_forward(name):
    target = tiny_target(name)
    ids = torch.randint(3, 256, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    full = target(ids, attention_mask=mask, output_hidden_states=True)
    eagle3 = OnlineFeatures(target, "eagle3", [1, 3, 5])({"input_ids": ids, "attention_mask": mask})
    expected = torch.cat([full.hidden_states[i] for i in (1, 3, 5)], dim=-1)
    torch.testing.assert_close(eagle3.features, expected)
    b, p = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 3, 6, 10])
    torch.testing.assert_close(eagle3.logits[b, p], full.logits[b, p], atol=1e-5, rtol=1e-5)
    eagle1 = OnlineFeatures(target, "eagle1", [6])({"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(eagle1.features, full.hidden_states[-1])
