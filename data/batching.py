"""Seeded, shuffled, rank-sharded batches, and the one place where lists become tensors.

Both `sft` and `grpo` draw their batches here, so the same (seed, epoch) gives the same batches
on every run and every rank sees the same number of batches (ranks step in lockstep).

`batch_indices`: permute 0..n-1 with `random.Random(seed, epoch)`; like torch's
DistributedSampler, pad the permutation by wrapping around to a multiple of world_size (or cut it
down with drop_last); rank r takes every world_size-th index starting at r, and cuts its share into
batches of batch_size (the last one smaller unless drop_last).

`length_grouped_batches`: shuffle, then sort by length inside "mega-batches" of
`batch_size * world_size * MEGA_BATCH_FACTOR` items so that each batch holds similar lengths (little
padding), yet batch composition changes every epoch; the batch order is shuffled as well.  The
batches are dealt round-robin to ranks, the list wrapped around so every rank gets as many.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from data.render import Rendered

MEGA_BATCH_FACTOR = 50


def _rng(seed: int, epoch: int) -> random.Random:
    # One stream per (seed, epoch): str seeds are hashed with SHA-512, stable across runs and machines.
    return random.Random(f"{seed}:{epoch}")


def _check_sharding(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def batch_indices(
    n_items: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    shuffle: bool = True, drop_last: bool = False,
) -> list[list[int]]:
    """This rank's batches of item indices for one epoch (see the module docstring)."""
    _check_sharding(batch_size, rank, world_size)
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    order = list(range(n_items))
    if shuffle:
        _rng(seed, epoch).shuffle(order)
    if drop_last:
        order = order[: n_items - n_items % world_size]
    elif order and n_items % world_size:
        padding = world_size - n_items % world_size
        order += (order * (padding // n_items + 1))[:padding]  # wrap around: every rank gets as many
    share = order[rank::world_size]
    batches = [share[start:start + batch_size] for start in range(0, len(share), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def length_grouped_batches(
    lengths: list[int], batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
) -> list[list[int]]:
    """This rank's batches, each of items with similar lengths; batch order shuffled (see above)."""
    _check_sharding(batch_size, rank, world_size)
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * world_size * MEGA_BATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        # Longest first inside a mega-batch; sorted() is stable, so ties keep their shuffled order.
        group = sorted(order[start:start + mega], key=lambda index: -lengths[index])
        batches += [group[offset:offset + batch_size] for offset in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    if batches and len(batches) % world_size:
        padding = world_size - len(batches) % world_size
        batches += (batches * (padding // len(batches) + 1))[:padding]
    return batches[rank::world_size]


@dataclass
class Batch:
    """Padded tensors of a list of `Rendered` samples; N rows, L = the longest row."""

    input_ids: torch.Tensor  # [N, L] long, pad_token_id on padding
    attention_mask: torch.Tensor  # [N, L] long, 1 on real tokens, 0 on padding
    loss_mask: torch.Tensor  # [N, L] long, the rendered 0/1 loss mask, 0 on padding
    position_ids: torch.Tensor  # [N, L] long, 0..len-1 on real tokens (left padding too), 0 on padding
    lengths: torch.Tensor  # [N] long, real tokens per row


def collate(rendered: list[Rendered], pad_token_id: int, *, padding_side: str = "right") -> Batch:
    """Pad a list of rendered samples into a `Batch`.

    Masks come from the renderer, never from comparing ids with pad_token_id (pad may equal EOS,
    and the EOS closing a completion must keep its loss).
    """
    if not rendered:
        raise ValueError("collate needs at least one rendered sample")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    for row, item in enumerate(rendered):
        if not item.input_ids or len(item.input_ids) != len(item.loss_mask):
            raise ValueError(f"rendered sample {row}: {len(item.input_ids)} input ids and {len(item.loss_mask)} "
                             "loss-mask entries (need the same, non-zero number)")
    count, width = len(rendered), max(len(item.input_ids) for item in rendered)
    input_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    loss_mask = torch.zeros((count, width), dtype=torch.long)
    position_ids = torch.zeros((count, width), dtype=torch.long)
    for row, item in enumerate(rendered):
        length = len(item.input_ids)
        columns = slice(0, length) if padding_side == "right" else slice(width - length, width)
        input_ids[row, columns] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, columns] = 1
        loss_mask[row, columns] = torch.tensor(item.loss_mask, dtype=torch.long)
        position_ids[row, columns] = torch.arange(length, dtype=torch.long)
    lengths = torch.tensor([len(item.input_ids) for item in rendered], dtype=torch.long)
    return Batch(input_ids, attention_mask, loss_mask, position_ids, lengths)
