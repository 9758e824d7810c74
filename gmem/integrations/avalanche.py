"""Generative replay for Avalanche strategies, backed by a GAN memory.

    from avalanche.training.supervised import Naive
    from gmem.integrations.avalanche import GANMemoryReplayPlugin

    replay = GANMemoryReplayPlugin(iterations=400)          # GANMemory.default(): the embedded base
    strategy = Naive(model, optimizer, criterion, plugins=[replay])
    for experience in benchmark.train_stream:
        strategy.train(experience)                          # then the experience becomes a GAN memory task

After each training experience the plugin learns the experience's images as one conditional task of
the memory (one class per label the experience holds). While a later experience trains, every
minibatch is extended by replayed samples of the earlier experiences: ONE mixed-task forward of the
memory per minibatch (:class:`gmem.memory.replay.ReplayGenerator`), each sample labelled with the global class
it was generated for. The labels come from the memory itself, not from an old copy of the classifier
as in Avalanche's own ``GenerativeReplayPlugin``, and nothing learned earlier changes when a new task
is learned (GAN memory's guarantee), so the replay of experience 1 is the same after 10 experiences.

Images: Avalanche datasets usually hold ``[C, H, W]`` tensors in ``[0, 1]`` (``ToTensor``). Experience
images are mapped to the memory's format (``[-1, 1]``, the memory's channels and size) and replayed
images back to the experience's channels, size and range (``input_range``); pass ``to_memory`` /
``from_memory`` to use other mappings.

Avalanche (``avalanche-lib``) is an optional dependency: this module imports it, nothing else in gmem
does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor
from torch.utils.data import DataLoader

from ..memory import GANMemory
from ..memory.replay import ReplayGenerator

__all__ = ["GANMemoryReplayPlugin"]


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _channels(x: Tensor, channels: int) -> Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot map images with {x.shape[1]} channels to {channels}")


class GANMemoryReplayPlugin(SupervisedPlugin):
    """Avalanche plugin: learn each training experience into ``memory``, replay the earlier ones.

    ``memory``: a :class:`gmem.GANMemory` (default: ``GANMemory.default()``); tasks it already holds
    are not replayed, only the ones this plugin learned. ``replay_size``: replayed samples added to each
    minibatch (default: as many as the minibatch holds). ``iterations``, ``batch_size``, ``lr``,
    ``seed`` and ``learn_options`` go to :meth:`gmem.GANMemory.learn`. ``task_name``: the memory task
    name of an experience (default ``experience<k>``). ``input_range``: the value range of the
    experience images. ``to_memory(x [N, C, H, W]) -> [N, C_mem, S, S]`` in [-1, 1] and
    ``from_memory(x, like) -> images shaped and scaled like like`` replace the default mappings.
    """

    def __init__(self, memory: Optional[GANMemory] = None, *, replay_size: Optional[int] = None,
                 iterations: int = 200, batch_size: int = 16, lr: Optional[float] = None, seed: int = 0,
                 task_name: Callable[[int], str] = lambda k: f"experience{k}",
                 input_range: tuple[float, float] = (0.0, 1.0), to_memory: Optional[Callable] = None,
                 from_memory: Optional[Callable] = None, learn_options: Optional[dict] = None):
        super().__init__()
        if replay_size is not None and (isinstance(replay_size, bool) or int(replay_size) != replay_size
                                        or replay_size < 1):
            raise ValueError(f"replay_size must be a positive int or None, got {replay_size!r}")
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range!r}")
        self.memory = memory if memory is not None else GANMemory.default()
        self.replay_size = replay_size
        self.input_range = (lo, hi)
        self.task_name = task_name
        self.seed = int(seed)
        self.learn_options = dict(iterations=iterations, batch_size=batch_size, progress=False,
                                  **(learn_options or {}))
        if lr is not None:
            self.learn_options["lr"] = lr
        self._to_memory = to_memory or self._default_to_memory
        self._from_memory = from_memory or self._default_from_memory
        self.class_map: dict[str, list[int]] = {}   # memory task -> global class of each local class
        self.task_labels: dict[str, int] = {}       # memory task -> the experience's Avalanche task label
        self.replay: Optional[ReplayGenerator] = None

    # ---------------------------------------------------------------------------------------------
    # image mappings
    # ---------------------------------------------------------------------------------------------
    def _default_to_memory(self, x: Tensor) -> Tensor:
        lo, hi = self.input_range
        x = (x.float() - lo) / (hi - lo) * 2 - 1
        x = _channels(x, self.memory.channels)
        return _resize(x, (self.memory.size, self.memory.size)).clamp(-1, 1)

    def _default_from_memory(self, x: Tensor, like: Tensor) -> Tensor:
        lo, hi = self.input_range
        x = _resize(_channels(x, like.shape[1]), tuple(like.shape[-2:]))
        return ((x + 1) / 2 * (hi - lo) + lo).clamp(lo, hi).to(like.dtype)  # resizing may overshoot

    # ---------------------------------------------------------------------------------------------
    # Avalanche callbacks
    # ---------------------------------------------------------------------------------------------
    def before_training_iteration(self, strategy, **kwargs):
        """Extend ``strategy.mbatch = [x, y, task_labels]`` by replayed samples of earlier experiences."""
        if self.replay is None:
            return
        x, y, t = strategy.mbatch[0], strategy.mbatch[1], strategy.mbatch[-1]
        n = self.replay_size or x.shape[0]
        with torch.no_grad():
            fake, labels, tasks = self.replay.generate_labelled(n)
        fake = self._from_memory(fake, x).to(x.device)
        task_labels = torch.tensor([self.task_labels[name] for name in tasks], dtype=t.dtype, device=t.device)
        strategy.mbatch[0] = torch.cat([x, fake])
        strategy.mbatch[1] = torch.cat([y, labels.to(y.device, y.dtype)])
        strategy.mbatch[-1] = torch.cat([t, task_labels])

    def after_training_exp(self, strategy, **kwargs):
        """Learn the experience that just trained as one conditional task of the memory."""
        experience = strategy.experience
        images, labels, task_label = self._collect(experience.dataset)
        classes = torch.unique(labels)  # sorted: local class k is global class classes[k]
        name = self.task_name(int(experience.current_experience))
        self.memory.learn(name, self._to_memory(images), labels=torch.searchsorted(classes, labels),
                          num_classes=len(classes), seed=self.seed + len(self.class_map), **self.learn_options)
        self.class_map[name] = [int(c) for c in classes]
        self.task_labels[name] = task_label
        self.replay = ReplayGenerator(self.memory, tasks=list(self.class_map), class_map=self.class_map,
                                      seed=self.seed)

    @staticmethod
    def _collect(dataset) -> tuple[Tensor, Tensor, int]:
        """All ``(images [N, C, H, W], labels [N] long, task label)`` of an experience's dataset."""
        xs, ys, ts = [], [], []
        for batch in DataLoader(dataset, batch_size=256, shuffle=False):
            xs.append(batch[0])
            ys.append(torch.as_tensor(batch[1]).long())
            if len(batch) > 2:
                ts.append(torch.as_tensor(batch[-1]).long())
        if not xs:
            raise ValueError("the experience holds no samples to learn")
        task_labels = torch.unique(torch.cat(ts)) if ts else torch.zeros(1, dtype=torch.long)
        if task_labels.numel() != 1:
            raise ValueError(f"an experience with several task labels ({task_labels.tolist()}) cannot be one "
                             f"GAN memory task")
        return torch.cat(xs), torch.cat(ys), int(task_labels[0])
