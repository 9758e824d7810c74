"""The :class:`Learner` protocol: what a lifelong generative learner does, GAN memory and every baseline.

A learner sees a stream of tasks. :meth:`Learner.learn` learns one task from a dataset of images
``[C, H, W]`` in [-1, 1] and its ``conditions``: one int for the whole task (task-incremental
generation: the condition is the task's index) or a LongTensor ``[N]`` of class ids (class-incremental
data); :meth:`Learner.sample` draws images ``[N, C, H, W]`` for ``z [N, z_dim]`` and one condition per
sample; :meth:`Learner.state_dict` is what would be saved. :meth:`Learner.replay` gives a replay source
for continual classification (samples and labels of the classes learned so far).

Implementations: :class:`gmem.baselines.GANLearner` and its subclasses (fine-tuning, MeRGAN, joint
training) and :class:`gmem.memory.learner.MemoryLearner` (GAN memory). The experiments choose among
them through one registry, :mod:`gmem.experiments.methods`.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, Union, runtime_checkable

from torch import Tensor

__all__ = ["Learner", "Conditions"]

#: one int for a whole task / per sample, or a LongTensor ``[N]`` of class ids
Conditions = Union[int, Sequence[int], Tensor]


@runtime_checkable
class Learner(Protocol):
    """A lifelong generative learner (see the module docstring)."""

    name: str

    def learn(self, dataset, conditions: Conditions, *, iterations: int, batch_size: int = 16, seed: int = 0,
              progress: bool = False) -> dict:
        """Learn one task; returns the training metrics (``iterations_done``, ``train_seconds``, ...)."""

    def sample(self, conditions: Conditions, z: Tensor) -> Tensor:
        """Images ``[N, C, H, W]`` in [-1, 1] for ``z [N, z_dim]`` and one condition per sample."""

    def replay(self, tasks: Sequence[Sequence[int]], n_per_task: int, seed: int) -> Callable[[], tuple]:
        """A replay source over the classes of earlier ``tasks`` (each a list of class ids): a callable
        returning ``(images [n, C, H, W], class ids [n])`` with ``n = n_per_task * len(tasks)``."""

    def state_dict(self) -> dict:
        """Everything the learner keeps (tensors and plain values)."""
