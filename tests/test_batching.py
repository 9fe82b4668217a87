"""Seeded, rank-sharded batch indices, length grouping, and collate."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.batching import batch_indices, collate, length_grouped_batches
from data.render import Rendered


def flat(batches: list[list[int]]) -> list[int]:
    return [index for batch in batches for index in batch]


def test_batch_indices_without_shuffle_is_plain_chunking():
    assert batch_indices(7, 3, seed=0, epoch=0, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batch_indices(7, 3, seed=0, epoch=0, shuffle=False, drop_last=True) == [[0, 1, 2], [3, 4, 5]]
    # two ranks: every other index, 7 -> padded to 8 by wrapping around to index 0
    assert batch_indices(7, 2, seed=0, epoch=0, shuffle=False, rank=0, world_size=2) == [[0, 2], [4, 6]]
    assert batch_indices(7, 2, seed=0, epoch=0, shuffle=False, rank=1, world_size=2) == [[1, 3], [5, 0]]
    assert batch_indices(0, 4, seed=0, epoch=0) == []


def test_batch_indices_shuffle_is_seeded_per_epoch():
    first = batch_indices(50, 8, seed=3, epoch=0)
    assert first == batch_indices(50, 8, seed=3, epoch=0)
    assert first != batch_indices(50, 8, seed=3, epoch=1) and first != batch_indices(50, 8, seed=4, epoch=0)
    assert sorted(flat(first)) == list(range(50)) and flat(first) != list(range(50))


@settings(max_examples=200, deadline=None)
@given(n_items=st.integers(0, 60), batch_size=st.integers(1, 9), world_size=st.integers(1, 5),
       drop_last=st.booleans(), seed=st.integers(0, 3), epoch=st.integers(0, 3))
def test_batch_indices_sharding_properties(n_items, batch_size, world_size, drop_last, seed, epoch):
    per_rank = [batch_indices(n_items, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                              drop_last=drop_last) for rank in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # ranks step in lockstep
    for batches in per_rank:
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert len(set(flat(batches))) == len(flat(batches))  # no index twice on one rank
        if drop_last:
            assert all(len(batch) == batch_size for batch in batches)
    everything = [index for batches in per_rank for index in flat(batches)]
    if drop_last:
        assert len(set(everything)) == len(everything)  # ranks are disjoint
    else:
        assert set(everything) == set(range(n_items))  # nothing is left out
        assert len(everything) == -(-n_items // world_size) * world_size


def test_bad_sharding_arguments_are_named():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        batch_indices(10, 2, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        length_grouped_batches([1, 2], 0, seed=0, epoch=0)


def test_length_grouped_batches_group_similar_lengths():
    lengths = [(index * 37) % 100 for index in range(100)]  # 0..99, scrambled
    batches = length_grouped_batches(lengths, 4, seed=1, epoch=0)
    assert sorted(flat(batches)) == list(range(100))
    # 100 items fit one mega-batch: fully sorted, so each batch holds 4 consecutive lengths
    assert all(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) == 3 for batch in batches)
    assert batches == length_grouped_batches(lengths, 4, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, 4, seed=1, epoch=1)  # batch order reshuffled
    assert [lengths[batch[0]] for batch in batches] != sorted((lengths[b[0]] for b in batches), reverse=True)


def test_length_grouped_batches_shard_evenly():
    lengths = list(range(23))
    per_rank = [length_grouped_batches(lengths, 4, seed=0, epoch=2, rank=rank, world_size=2) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3  # 6 batches (the last of 3 items), dealt in turn
    assert set(flat(per_rank[0]) + flat(per_rank[1])) == set(range(23))


def rendered(ids: list[int], mask: list[int]) -> Rendered:
    return Rendered(input_ids=ids, loss_mask=mask, prompt_length=mask.index(1) if 1 in mask else len(mask))


def test_collate_right_padding_hand_computed():
    # pad id 2 equals the last (end-of-turn) token of the first sample: its loss must survive
    items = [rendered([5, 6, 7, 2], [0, 0, 1, 1]), rendered([8, 9], [0, 1])]
    before = copy.deepcopy(items)
    batch = collate(items, pad_token_id=2)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2], [8, 9, 2, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert batch.lengths.tolist() == [4, 2]
    assert all(tensor.dtype == torch.long for tensor in vars(batch).values())
    assert items == before  # inputs untouched


def test_collate_left_padding_hand_computed():
    batch = collate([rendered([5, 6, 7], [0, 1, 1]), rendered([8], [1])], pad_token_id=0, padding_side="left")
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.loss_mask.tolist() == [[0, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_collate_rejects_bad_input_with_clear_errors():
    with pytest.raises(ValueError, match="at least one"):
        collate([], 0)
    with pytest.raises(ValueError, match="rendered sample 1: 2 input ids and 1 loss-mask"):
        collate([rendered([1], [1]), Rendered([1, 2], [1], 0)], 0)
    with pytest.raises(ValueError, match="padding_side"):
        collate([rendered([1], [1])], 0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        collate([rendered([1], [1])], None)
