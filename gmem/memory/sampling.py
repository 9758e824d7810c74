"""Sampling from a GAN memory: latents, per-task and mixed-task batches, style interpolation."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import nn as gnn
from ..data import label_vector
from ..seeding import generator
from .registry import TaskRegistry

__all__ = ["TaskSampler"]

TaskRef = Union[str, int]


class TaskSampler:
    """Draws images from the tasks of ``registry``; ``ensure_loaded(task)`` reads a task on first use."""

    def __init__(self, registry: TaskRegistry, ensure_loaded: Callable[[str], None]):
        self.registry, self.ensure_loaded = registry, ensure_loaded

    @property
    def z_dim(self) -> int:
        return self.registry.G.z_dim

    # ------------------------------------------------------------------ latents / labels
    def latents(self, n: int, seed: Optional[int] = None) -> Tensor:
        """``z [n, z_dim]``: standard normal; with ``seed`` always the same values for the same seed."""
        if seed is None:
            return torch.randn(n, self.z_dim)
        return torch.randn(n, self.z_dim, generator=generator(seed))

    def z(self, n: Optional[int], z: Optional[Tensor], seed: Optional[int]) -> Tensor:
        if z is not None:
            z = torch.as_tensor(z)
            if z.ndim != 2 or z.shape[1] != self.z_dim or not z.is_floating_point():
                raise ValueError(f"z must be a float tensor [n, {self.z_dim}], got {z.dtype} {tuple(z.shape)}")
            if n is not None and n != z.shape[0]:
                raise ValueError(f"n={n} but z has {z.shape[0]} rows")
            return z.float()
        if n is None:
            raise ValueError("give n (the number of samples) or z")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return self.latents(n, seed)

    def class_ids(self, names: list[str], labels, n: int) -> Optional[Tensor]:
        """Per-sample class ids for conditional tasks (checked), zeros elsewhere; None if none is conditional."""
        classes = [self.registry.num_classes(t) for t in names]
        if labels is None:
            if not any(classes):
                return None
            return torch.tensor([i % c if c else 0 for i, c in enumerate(classes)], dtype=torch.long)
        labels = label_vector(labels, n)
        for i, (t, c, y) in enumerate(zip(names, classes, labels.tolist())):
            if t == "source":
                continue
            if c is None:
                if y != 0:
                    raise ValueError(f"task {t!r} is unconditional: it has no classes (got label {y} for sample {i})")
            elif not 0 <= y < c:
                raise IndexError(f"class {y} out of range for task {t!r}, which has {c} classes (0..{c - 1})")
        return labels

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, task: Union[TaskRef, Sequence[TaskRef]], n: Optional[int] = None, z: Optional[Tensor] = None,
               seed: Optional[int] = None, labels=None, batch_size: int = 64) -> Tensor:
        """See :meth:`gmem.GANMemory.sample`."""
        reg = self.registry
        if isinstance(task, (list, tuple)):
            names = [reg.name(t) for t in task]
            if n is not None and n != len(names):
                raise ValueError(f"n={n} but {len(names)} tasks were given (one per sample)")
            n = len(names)
        else:
            names = None
            single = reg.name(task)
        z = self.z(n, z, seed)
        n = z.shape[0]
        if names is None:
            names = [single] * n
        for t in dict.fromkeys(names):
            self.ensure_loaded(t)
        if all(t == "source" for t in names):
            y = None if labels is None else torch.as_tensor(labels).long()
            return self.run_g(z, y=y, batch_size=batch_size)
        class_ids = self.class_ids(names, labels, n)
        if len(set(names)) == 1:
            return self.run_g(z, task=names[0], class_ids=class_ids, batch_size=batch_size)
        return self.run_g(z, task_list=names, class_ids=class_ids, batch_size=batch_size)

    def run_g(self, z: Tensor, task: Optional[str] = None, task_list: Optional[list[str]] = None,
              class_ids: Optional[Tensor] = None, y: Optional[Tensor] = None, batch_size: int = 64,
              ctx=None) -> Tensor:
        """The generator in eval mode on ``z [N, z_dim]`` in chunks; images ``[N, C, H, W]`` on the CPU."""
        G, device = self.registry.G, self.registry.device
        was_training = G.training
        G.eval()
        out = []
        try:
            for s in range(0, z.shape[0], max(1, batch_size)):
                zs = z[s:s + batch_size].to(device)
                ys = None if y is None else y[s:s + batch_size].to(device)
                with contextlib.ExitStack() as stack:
                    if ctx is not None:
                        stack.enter_context(ctx())
                    elif task_list is not None:
                        stack.enter_context(gnn.use_tasks(G, task_list[s:s + batch_size]))
                    else:
                        stack.enter_context(gnn.use_task(G, task or "source"))
                    if class_ids is not None:
                        stack.enter_context(gnn.use_classes(G, class_ids[s:s + batch_size]))
                    out.append(G(zs, ys).cpu())
        finally:
            G.train(was_training)
        return torch.cat(out) if out else z.new_zeros(0, G.channels, G.size, G.size)

    @torch.no_grad()
    def interpolate(self, task_a: TaskRef, task_b: TaskRef, lam, n: Optional[int] = None, seed: Optional[int] = None,
                    z: Optional[Tensor] = None, groups=("gamma", "beta", "bias"), layers=None, labels=None,
                    batch_size: int = 64) -> Tensor:
        """See :meth:`gmem.GANMemory.interpolate`."""
        reg = self.registry
        a, b = reg.name(task_a), reg.name(task_b)
        self.ensure_loaded(a)
        self.ensure_loaded(b)
        z = self.z(n, z, seed)
        class_ids = self.class_ids([a] * z.shape[0], labels, z.shape[0])
        lams = [lam] if isinstance(lam, (int, float)) else list(lam)
        outs = []
        for value in lams:
            ctx = lambda value=value: gnn.interpolate(reg.G, a, b, float(value), groups=groups, layers=layers)
            outs.append(self.run_g(z, class_ids=class_ids, batch_size=batch_size, ctx=ctx))
        return outs[0] if isinstance(lam, (int, float)) else torch.stack(outs)
