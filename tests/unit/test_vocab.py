"""Draft vocabulary: frequencies → d2t / t2d, and the round trip between draft and target ids."""

import datasets
import pytest
import torch
from tiny_targets import tiny_target

from baldeagle.model.draft_config import draft_config_from_target
from baldeagle.model.eagle3 import Eagle3Draft
from baldeagle.model.vocab import build_draft_vocab, count_trained_tokens, target_to_draft_ids, used_ids_from_d2t

#                     id: 0  1  2  3  4  5  6  7  8  9
COUNTS = torch.tensor([5, 0, 7, 7, 1, 0, 3, 2, 0, 9])


@pytest.mark.parametrize(
    "size, used",
    [
        (4, [0, 2, 3, 9]),  # 9, 7, 7, 5 → sorted by id
        (5, [0, 2, 3, 6, 9]),
        (2, [2, 9]),  # ids 2 and 3 tie at 7: the lower id wins
        (9, [0, 1, 2, 3, 4, 5, 6, 7, 9]),  # 7 seen tokens, then the lowest unused ids 1 and 5
        (50, list(range(10))),  # capped at the vocabulary
    ],
)
def test_build_draft_vocab(size, used):
    d2t, t2d, used_ids = build_draft_vocab(COUNTS, size)
    assert used_ids.tolist() == used
    assert d2t.tolist() == [u - i for i, u in enumerate(used)]
    assert t2d.tolist() == [j in used for j in range(10)]
    assert d2t.dtype == torch.long and t2d.dtype == torch.bool


def test_draft_and_target_ids_round_trip():
    d2t, t2d, used = build_draft_vocab(COUNTS, 4)
    assert d2t.tolist() == [0, 1, 1, 6]
    draft_ids = torch.arange(4)
    assert (draft_ids + d2t[draft_ids]).tolist() == used.tolist() == used_ids_from_d2t(d2t).tolist()
    assert target_to_draft_ids(used, t2d).tolist() == [0, 1, 2, 3]
    assert target_to_draft_ids(torch.tensor([[1, 9], [8, 3]]), t2d).tolist() == [[-1, 3], [-1, 2]]


def test_eagle3_draft_maps_its_ids_with_d2t():
    target = tiny_target("llama")
    cfg = draft_config_from_target(target.config, "eagle3", draft_vocab_size=4)
    counts = torch.zeros(256, dtype=torch.long)
    counts[[7, 30, 31, 200]] = torch.tensor([1, 5, 2, 9])
    d2t, t2d, used = build_draft_vocab(counts, 4)
    draft = Eagle3Draft.from_target(target, cfg, d2t=d2t)
    assert draft.to_target_ids(torch.tensor([[0, 1, 2, 3]])).tolist() == [[7, 30, 31, 200]]
    assert torch.equal(draft.t2d, t2d)


def test_count_trained_tokens_reads_only_loss_masked_tokens():
    rows = {"input_ids": [[1, 2, 3], [3, 3, 4, 5]], "loss_mask": [[0, 1, 1], [1, 1, 0, 1]]}
    expected = [0, 0, 1, 3, 0, 1, 0, 0]
    dataset = datasets.Dataset.from_dict(rows)
    assert count_trained_tokens(dataset, 8).tolist() == expected
    assert count_trained_tokens(dataset, 8, batch_size=1).tolist() == expected
    assert count_trained_tokens(dataset.select([1]), 8).tolist() == [0, 0, 0, 2, 0, 1, 0, 0]
    assert count_trained_tokens(list(dataset), 8).tolist() == expected
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_trained_tokens(dataset, 5)
    with pytest.raises(ValueError, match="differ in length"):
        count_trained_tokens([{"input_ids": [1, 2], "loss_mask": [1]}], 8)
