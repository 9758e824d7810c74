"""Each rank's share of a global batch: its batch size, its rows, its indices of the data stream."""
from __future__ import annotations

from typing import Optional

import torch

from ..data import InfiniteSampler
from .group import _info, rank, world_size

__all__ = ["ShardedInfiniteSampler", "local_batch_size", "shard"]


def local_batch_size(global_batch_size: int) -> int:
    """``global_batch_size / world_size()``; ValueError when it does not divide evenly."""
    world = world_size()
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global batch size must be a positive int, got {global_batch_size!r}")
    if global_batch_size % world:
        raise ValueError(f"global batch size {global_batch_size} does not divide over {world} processes; "
                         f"use a multiple of {world} or another --nproc_per_node")
    return global_batch_size // world


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a global batch ``[B, ...] -> [B / world, ...]`` (contiguous block ``rank``)."""
    b = local_batch_size(int(x.shape[0]))
    return x[rank() * b:(rank() + 1) * b]


class ShardedInfiniteSampler:
    """This rank's share of the :class:`gmem.data.InfiniteSampler` stream of global batches.

    Every rank runs the same global stream (``n`` items, global batch
    ``batch_size_per_rank * world``, ``seed``) and keeps block ``rank`` of each global batch, so the
    ranks' batches are disjoint and together are exactly the single-process batch of that seed.
    The state (``epoch``, ``pos``, ``seed``) counts positions of the global stream only, so it is the
    same on every rank, loads into any world size (and from or into a plain ``InfiniteSampler``), and
    a resumed run continues the same sequence of images.
    """

    def __init__(self, n: int, batch_size_per_rank: int, seed: int, rank: Optional[int] = None,
                 world: Optional[int] = None):
        here = _info()
        rank = here.rank if rank is None else rank
        world = here.world_size if world is None else world
        for name, v, lo in (("n", n, 1), ("batch_size_per_rank", batch_size_per_rank, 1), ("world", world, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"ShardedInfiniteSampler: {name} must be an int >= {lo}, got {v!r}")
        if not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"ShardedInfiniteSampler: rank must be an int in [0, {world}), got {rank!r}")
        self.rank, self.world, self.batch_size = rank, world, batch_size_per_rank
        self._global = InfiniteSampler(n, batch_size_per_rank * world, seed)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world

    def next_indices(self) -> torch.Tensor:
        """LongTensor ``[batch_size_per_rank]``: this rank's indices of the next global batch."""
        idx = self._global.next_indices()
        return idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return self._global.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._global.load_state_dict(state)


