"""Per-task copies of shared modules (normalisation layers by default), peft's ``modules_to_save``.

A BatchNorm shared by every task would let training one task move the running statistics and
affine parameters every other task (and the source) depends on. :class:`PerTaskModule` keeps the
original module as ``base`` (frozen, used by the source, untouched) and one copy per added task in
``copies`` (an ``nn.ModuleDict`` keyed by task name). Selection works as for modulated layers.

Mixed-task batches assume dim 0 of the first argument is the batch: the samples of each task run
through that task's copy. A module whose output mixes samples (BatchNorm in training mode, or
without running statistics) cannot do that: a mixed batch through it raises a ValueError.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import ops
from .bank import TaskBank

__all__ = ["PerTaskModule", "NORM_TYPES", "mixes_samples"]

#: module types copied per task by default (when they hold parameters or buffers)
NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)


def mixes_samples(module: nn.Module) -> bool:
    """Whether the output of a sample depends on the other samples of the batch (batch statistics)."""
    for m in module.modules():
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None):
            return True
        if isinstance(m, _InstanceNorm) and m.training and m.track_running_stats:
            return True  # updates shared running statistics from the whole batch
    return False


class PerTaskModule(TaskBank):
    """A module with one copy per task: ``base`` for the source, ``copies[name]`` for the others.

    Inputs and outputs are those of the wrapped module (``x [N, ...]`` for mixed-task batches).
    """

    bank_attr = "copies"

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self._init_bank()

    def module(self, index: int) -> nn.Module:
        """The module task ``index`` runs (0: the original)."""
        return self.base if index == 0 else self.entry(index)

    def make_entry(self, name: str, init: int = 0, **_) -> nn.Module:
        new = copy.deepcopy(self.module(init))
        for p in new.parameters():
            p.requires_grad_(True)
        return new

    def forward(self, x: Tensor, *args, **kwargs):
        sel = self.selection()
        if sel.override is not None:
            index, values = sel.override  # interpolation: task index and its mixed tensors
            return torch.func.functional_call(self.module(index), values, (x, *args), kwargs)
        if sel.task_ids is None:
            return self.module(sel.task)(x, *args, **kwargs)
        return self._forward_mixed(sel.task_ids, x, *args, **kwargs)

    def _forward_mixed(self, task_ids: Tensor, x: Tensor, *args, **kwargs):
        n = x.shape[0]
        if task_ids.shape != (n,):
            raise ValueError(f"task_ids must have shape [N] = [{n}] (one task per sample), got {tuple(task_ids.shape)}")
        if not ops.values_known(task_ids):
            # compile, meta or fake tensors, no data-dependent shapes: every task runs the whole batch,
            # each sample keeps its own task's rows (only modules that do not mix samples may do that,
            # checked first)
            if any(mixes_samples(self.module(t)) for t in range(self.num_tasks)):
                raise ValueError(self._mixing_message())
            out = None
            for t in range(self.num_tasks):
                y = self.module(t)(x, *args, **kwargs)
                mask = (task_ids == t).view(n, *([1] * (y.ndim - 1)))
                out = y if out is None else torch.where(mask, y, out)
            return out
        present = torch.unique(task_ids).tolist()
        if present and (present[0] < 0 or present[-1] >= self.num_tasks):
            raise IndexError(f"task_ids must lie in [0, {self.num_tasks}) for tasks {self.task_names}, got {present}")
        if len(present) == 1:
            return self.module(present[0])(x, *args, **kwargs)
        if any(mixes_samples(self.module(t)) for t in present):
            raise ValueError(self._mixing_message())
        out: Optional[Tensor] = None
        for t in present:
            rows = (task_ids == t).nonzero().squeeze(1)
            y = self.module(t)(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = y.new_empty((n, *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        return out

    def _mixing_message(self) -> str:
        return (
            f"a mixed-task batch cannot pass a per-task {type(self.base).__name__} that uses batch "
            "statistics (training mode): each task's statistics would depend on the other tasks' samples. "
            "Train one task per batch (gmem.nn.use_task), or put the model in eval mode"
        )

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}"
