"""Group the samples of a mixed-task batch by task, on the device, without host synchronisation.

The result describes at most ``S = min(T, N)`` *segments* (slots): segment ``s`` holds the samples
``order[start[s] : start[s] + count[s]]`` (a stable sort of ``task_ids``, so each segment keeps its
samples' original relative order), all of task ``task[s]``. Slots beyond the number of tasks present
have ``count = 0`` and ``task = T`` (a dummy that no kernel reads). Memory and work grow with the
batch, never with the number of tasks stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class TaskGroups:
    """Segments of a batch (all int32 on the batch's device); ``order is None`` means identity."""

    order: Optional[Tensor]  # [N] sorted position -> original sample index
    start: Tensor  # [S] first sorted position of each segment
    count: Tensor  # [S] samples in each segment (0 for unused slots)
    task: Tensor  # [S] task of each segment (T for unused slots)
    num_tasks: int  # T, the number of stacked style sets

    @property
    def num_slots(self) -> int:
        return self.count.shape[0]

    def per_task(self, per_slot: Tensor) -> Tensor:
        """``[S, *rest]`` per-slot values -> ``[T, *rest]`` per task (zeros for absent tasks).

        A gather, not a scatter-add: deterministic, every task reads at most one slot.
        """
        t = self.num_tasks
        slot_of_task = torch.zeros(t + 1, dtype=torch.int64, device=per_slot.device)
        slots = torch.arange(self.num_slots, device=per_slot.device)
        # unused slots all write the dummy entry t, which is dropped
        slot_of_task.scatter_(0, self.task.long(), slots)
        present = torch.zeros(t + 1, dtype=torch.bool, device=per_slot.device)
        present.scatter_(0, self.task.long(), self.count > 0)
        picked = per_slot.index_select(0, slot_of_task[:t])
        mask = present[:t].reshape(t, *([1] * (per_slot.ndim - 1)))
        return torch.where(mask, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))


def group_by_task(task_ids: Tensor, num_tasks: int) -> TaskGroups:
    """Segments of ``task_ids [N]`` (int64, values in ``[0, num_tasks)``), computed on the device."""
    task_ids = task_ids.long()
    n = task_ids.shape[0]
    device = task_ids.device
    slots = max(1, min(num_tasks, n))
    order = torch.argsort(task_ids, stable=True)
    sorted_ids = task_ids.index_select(0, order)
    new_segment = torch.ones(n, dtype=torch.bool, device=device)
    if n > 1:
        new_segment[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment_of = torch.cumsum(new_segment.to(torch.int64), 0) - 1  # [N], sorted position -> slot
    count = torch.zeros(slots, dtype=torch.int64, device=device).scatter_add_(
        0, segment_of, torch.ones_like(segment_of)
    )
    start = torch.cumsum(count, 0) - count
    # every writer of a slot writes the same task id: deterministic
    task = torch.full((slots,), num_tasks, dtype=torch.int64, device=device).scatter_(0, segment_of, sorted_ids)
    as32 = lambda t: t.to(torch.int32)  # noqa: E731
    return TaskGroups(as32(order), as32(start), as32(count), as32(task), num_tasks)


def single_group(n: int, device: torch.device) -> TaskGroups:
    """One segment holding the whole batch in its order (the single-task case): task 0 of 1."""
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    return TaskGroups(None, zero, torch.full((1,), n, dtype=torch.int32, device=device), zero.clone(), 1)
