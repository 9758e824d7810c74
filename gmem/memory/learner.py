"""GAN memory as a :class:`gmem.training.learner.Learner`, the interface the experiments drive.

Task-incremental (``conditions`` one int ``k``): task ``k`` is an unconditional task of the memory,
named ``tasks[k]`` (default ``task<k+1>``). Class-incremental (``conditions`` a LongTensor ``[N]`` of
class ids): each call learns one conditional task (named ``task<t>`` in learning order) whose local
class ``i`` is the ``i``-th of its sorted class ids; sampling and replay map class ids back to
(task, local class) and draw every task of a batch in one mixed-task forward
(:class:`gmem.memory.replay.ReplayGenerator`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..models import Discriminator, Generator
from .gan_memory import GANMemory
from .replay import ReplayGenerator

__all__ = ["MemoryLearner"]


class MemoryLearner:
    """A :class:`GANMemory` on the base ``(G, D)`` (copied) learning with ``lr`` and ``learn_options``."""

    name = "gan_memory"

    def __init__(self, G: Generator, D: Discriminator, *, tasks: Optional[Sequence[str]] = None, lr: float = 1e-4,
                 **learn_options):
        self.memory = GANMemory.from_base(G, D)
        self.task_names = None if tasks is None else list(tasks)
        self.lr, self.learn_options = lr, learn_options
        self.classes: dict[str, list[int]] = {}  # conditional task -> its class ids (local id = position)

    def _task(self, k: int) -> str:
        return self.task_names[k] if self.task_names is not None else f"task{k + 1}"

    def learn(self, dataset, conditions, *, iterations: int, batch_size: int = 16, seed: int = 0,
              progress: bool = False) -> dict:
        options = dict(iterations=iterations, batch_size=batch_size, seed=seed, lr=self.lr, progress=progress,
                       **self.learn_options)
        if isinstance(conditions, int):
            name = self._task(conditions)
            self.memory.learn(name, dataset, **options)
        else:
            ids = torch.as_tensor(conditions).long()
            name = self._task(len(self.memory.tasks))
            classes = sorted(set(ids.tolist()))
            local = torch.tensor([classes.index(int(c)) for c in ids])
            self.memory.learn(name, dataset, labels=local, num_classes=len(classes), **options)
            self.classes[name] = classes
        return dict(self.memory.records[name]["metrics"])

    def _class_map(self) -> dict:
        return {task: classes for task, classes in self.classes.items()}

    def sample(self, conditions, z: Tensor) -> Tensor:
        if isinstance(conditions, int):
            return self.memory.sample(self._task(conditions), z=z)
        ids = torch.as_tensor(conditions).long().tolist()
        where = {c: (task, i) for task, classes in self.classes.items() for i, c in enumerate(classes)}
        return self.memory.sample([where[c][0] for c in ids], z=z, labels=torch.tensor([where[c][1] for c in ids]))

    def replay(self, tasks: Sequence[Sequence[int]], n_per_task: int, seed: int) -> Callable[[], tuple]:
        names = [name for name, classes in self.classes.items() if list(classes) in [sorted(t) for t in tasks]]
        gen = ReplayGenerator(self.memory, class_map={name: self.classes[name] for name in names}, seed=seed)
        condition = [name for name in names for _ in range(n_per_task)]
        return lambda: gen.generate_labelled(len(condition), condition=condition)[:2]

    def state_dict(self) -> dict:
        return {f"{task}/{key}": value for task in self.memory.tasks
                for key, value in self.memory.task_tensors(task).items()}
