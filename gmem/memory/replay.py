"""Generative replay from a GAN memory, for continual-learning code that takes a generator.

    replay = ReplayGenerator(memory, class_map={"t1": [0, 1], "t2": [2, 3]}, seed=0)
    x = replay.generate(32)                      # [32, C, H, W]: every task, every class, one forward
    x, y, tasks = replay.generate_labelled(32)   # with the global class of each sample
    x = replay.generate(8, condition="t2")       # one task
    x = replay.generate(8, condition=2)          # one global class (needs class_map)

:meth:`ReplayGenerator.generate` has the signature of the generator interface of continual-learning
libraries (``generate(batch_size, condition=None)``, e.g. Avalanche's generative replay); a mixed batch
is drawn as ONE forward through :meth:`gmem.GANMemory.sample` with a list of task names.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..seeding import generator

__all__ = ["ReplayGenerator"]


class ReplayGenerator:
    """Samples of the tasks of ``memory`` (a :class:`gmem.GANMemory`).

    ``tasks``: which tasks to replay (default: all learned tasks, read when sampling, so tasks learned
    later join). ``class_map``: ``{task: [global class id of local class 0, 1, ...]}`` for conditional
    tasks (default: a conditional task's local ids; an unconditional task gets label -1 unless mapped
    to one class). ``seed``: latents, tasks and classes come from a generator seeded with it (None: the
    global RNG).
    """

    def __init__(self, memory, tasks: Optional[Sequence[str]] = None, class_map: Optional[dict] = None,
                 seed: Optional[int] = None):
        self.memory = memory
        self._tasks = None if tasks is None else [memory.task_name(t) for t in tasks]
        self.class_map = {}
        for task, classes in (class_map or {}).items():
            name = memory.task_name(task)
            k = memory.num_classes(name) or 1
            if len(classes) != k:
                raise ValueError(f"class_map[{task!r}] lists {len(classes)} classes, the task has {k}")
            self.class_map[name] = [int(c) for c in classes]
        self.rng = None if seed is None else generator(seed)

    @property
    def tasks(self) -> list[str]:
        return list(self.memory.tasks) if self._tasks is None else list(self._tasks)

    def _randint(self, high: int, n: int) -> Tensor:
        return torch.randint(high, (n,), generator=self.rng)

    def _global(self, task: str, local: int) -> int:
        if task in self.class_map:
            return self.class_map[task][local]
        return local if self.memory.num_classes(task) else -1

    def _plan(self, batch_size: int, condition) -> tuple[list[str], Tensor]:
        """``(task per sample, local class per sample)`` for ``condition``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        if condition is None:
            pool = self.tasks
            if not pool:
                raise ValueError("the memory has no tasks to replay")
            names = [pool[i] for i in self._randint(len(pool), batch_size).tolist()]
        elif isinstance(condition, str):
            names = [self.memory.task_name(condition)] * batch_size
        elif isinstance(condition, int) and not isinstance(condition, bool):
            owners = [(t, i) for t in self.tasks for i, c in enumerate(self.class_map.get(t, [])) if c == condition]
            if not owners:
                raise KeyError(f"no replayed task has global class {condition} (see class_map)")
            picks = self._randint(len(owners), batch_size).tolist()
            return [owners[p][0] for p in picks], torch.tensor([owners[p][1] for p in picks], dtype=torch.long)
        elif isinstance(condition, (list, tuple)):
            if len(condition) != batch_size:
                raise ValueError(f"condition lists {len(condition)} tasks for batch_size={batch_size}")
            names = [self.memory.task_name(t) for t in condition]
        else:
            raise TypeError(f"condition must be None, a task name, a global class id or a list of task names, "
                            f"got {type(condition).__name__}")
        local = torch.zeros(batch_size, dtype=torch.long)
        for i, t in enumerate(names):
            k = self.memory.num_classes(t)
            if k:
                local[i] = int(self._randint(k, 1))
        return names, local

    def generate_labelled(self, batch_size: int, condition: Union[None, str, int, Sequence[str]] = None
                          ) -> tuple[Tensor, Tensor, list[str]]:
        """``(images [B, C, H, W] in [-1, 1], global class ids [B] long, task names [B])`` in one forward."""
        names, local = self._plan(batch_size, condition)
        if batch_size == 0:
            return self.memory.sample("source", 0), torch.zeros(0, dtype=torch.long), []
        z = torch.randn(batch_size, self.memory.z_dim, generator=self.rng)
        x = self.memory.sample(names, z=z, labels=local)
        y = torch.tensor([self._global(t, int(c)) for t, c in zip(names, local)], dtype=torch.long)
        return x, y, names

    def generate(self, batch_size: int, condition: Union[None, str, int, Sequence[str]] = None) -> Tensor:
        """Images ``[batch_size, C, H, W]`` in [-1, 1]: ``condition`` None (tasks drawn uniformly, classes
        uniformly within a task), a task name, a global class id (with ``class_map``) or one task per sample."""
        return self.generate_labelled(batch_size, condition)[0]
