"""Long context: a draft keeps its target's maximum positions and RoPE scaling, and speculative
decoding (chain and EAGLE-2 tree) of a prompt past 8k tokens equals Transformers' greedy `generate`."""

from types import SimpleNamespace

import pytest
import torch
from tiny_targets import tiny_draft, tiny_target

from baldeagle.decode.speculative import SpecSettings, speculative_generate

# Llama 3.1's RoPE: frequencies rescaled past an original context of 2048 (8192 in the real model),
# so a draft with plain RoPE would rotate its keys differently from the target's at every position.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}
PROMPT_TOKENS = 8250
SHAPES = {"chain": {"mode": "chain", "num_draft_tokens": 4},
          "tree": {"mode": "tree", "tree_depth": 4, "tree_topk": 3, "tree_total_tokens": 12}}


class OracleDraft(torch.nn.Module):
    """A draft that knows the answer: the row at position p (which reads x_{p+1}) proposes x_{p+2} of
    `sequence` (prompt + the target's greedy answer), except at every `miss`-th position, where it
    proposes another token. So verification accepts long runs, then rejects, at positions past 8k,
    exercising the cache bookkeeping a random draft (which is rejected at once) never reaches."""

    def __init__(self, sequence: list[int], vocab: int, miss: int = 5):
        super().__init__()
        self.sequence, self.vocab, self.miss = sequence, vocab, miss
        self.config = SimpleNamespace(aux_layer_ids=[1])

    def project(self, features):
        return features

    def forward(self, input_ids, hidden, position_ids, cache=None, attention_mask=None):
        fake = input_ids[:, None, :, None].float()  # one cache entry per row, so crop/select apply
        cache.append(fake, fake)
        out = torch.full((1, input_ids.shape[1], self.vocab), -30.0)
        for i, p in enumerate(position_ids[0].tolist()):
            token = self.sequence[p + 2] if p + 2 < len(self.sequence) else 0
            out[0, i, (token + 1) % self.vocab if p % self.miss == 0 else token] = 0.0
        return out

    def logits(self, out):
        return out

    def to_target_ids(self, ids):
        return ids


@pytest.fixture(scope="module")
def long_case():
    target = tiny_target("llama", num_hidden_layers=4, max_position_embeddings=16384, rope_parameters=LLAMA3_ROPE)
    ids = torch.randint(3, 256, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    expected = target.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))[0, PROMPT_TOKENS:].tolist()
    return target, ids, expected


def test_the_draft_keeps_the_targets_positions_and_rope_scaling(long_case):
    target, _, _ = long_case
    for draft_type in ("eagle3", "eagle1"):
        draft, cfg = tiny_draft(target, draft_type)
        assert cfg.max_position_embeddings == 16384 and cfg.rope_parameters == LLAMA3_ROPE
        # the same rotary frequencies as the target's layers (llama3-rescaled, not plain theta)
        torch.testing.assert_close(draft.rotary_emb.inv_freq, target.model.rotary_emb.inv_freq)
        plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
        assert not torch.allclose(draft.rotary_emb.inv_freq, plain)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_decoding_past_8k_tokens_equals_generate(long_case, mode):
    target, ids, expected = long_case
    draft, _ = tiny_draft(target, "eagle3")  # a real draft: its RoPE runs at positions past 8k
    got = speculative_generate(target, draft, ids, SpecSettings(**SHAPES[mode], max_new_tokens=6))
    assert got.tokens == expected[:6]
    oracle = OracleDraft(ids[0].tolist() + expected, vocab=256)
    got = speculative_generate(target, oracle, ids, SpecSettings(**SHAPES[mode], max_new_tokens=24))
    assert got.tokens == expected
    assert max(got.accepted) == 4 and min(got.accepted) < 4  # full runs and rejections both happened
