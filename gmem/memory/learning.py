"""Learning one task of a GAN memory with the shared GP-GAN step (:mod:`gmem.training`).

Only the task's style parameters (generator and discriminator) and its discriminator head train.
Defaults follow the released GAN memory code: the generator update first, then the discriminator
update on that same fake batch (detached), R1 ``10 * E||grad||^2`` on reals, Adam (1e-4, betas
(0, 0.99)), flips and ``U[0, 1/128)`` dequantisation noise. gmem adds an EMA warm-up
(``min(decay, (1 + t) / (10 + t))``) so that short runs are not dominated by the initial style set.

Under torchrun (``torchrun --nproc_per_node N -m gmem.cli learn ...``, or a script that calls
:meth:`gmem.GANMemory.learn` inside ``with gmem.distributed.distributed():``) each rank trains on its
share of every global batch (``batch_size``) and only the task's parameters are synchronised; rank 0
writes the checkpoints and samples, and a checkpoint resumes with any number of processes dividing
``batch_size`` (:mod:`gmem.training.step`). Saving the memory afterwards is the caller's job, on
rank 0 (``if gmem.distributed.is_main(): memory.save(...)``).
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..compress import knowledge
from ..data import DataError, as_dataset
from ..seeding import generator, random_seed
from ..training import LEARN_DEFAULTS, GANParts, GANStep, Plugin, RealBatches, StepConfig, TrainLoop, data_fingerprint
from . import compression
from .registry import TaskRegistry

__all__ = ["as_task_dataset", "task_labels", "learn_settings", "train_task", "learn_task"]

# settings that describe the data or the run length, not how it trains (not compared on resume)
_NOT_COMPARED = ("iterations", "data", "num_images")


def as_task_dataset(data, size: int, channels: int):
    """``data`` as a dataset at the memory's resolution; a float tensor must already have it."""
    if isinstance(data, Tensor) and data.is_floating_point():
        if data.ndim != 4:
            raise DataError(f"image tensor must be [N, C, H, W], got {tuple(data.shape)}")
        if tuple(data.shape[-2:]) != (size, size):
            raise DataError(f"wrong resolution: images are {data.shape[-2]}x{data.shape[-1]}, this memory's "
                            f"base is {size}x{size} (resize the tensor, or pass a folder/array file, "
                            "which are resized automatically)")
        if data.shape[1] not in (1, channels):
            raise DataError(f"images have {data.shape[1]} channels, the base has {channels}")
    return as_dataset(data, size, channels)


def task_labels(dataset, labels, num_classes) -> tuple[Optional[Tensor], Optional[int]]:
    """``(labels [N] long or None, number of classes or None)`` from the ``learn`` arguments."""
    if labels is None or labels is False:
        if num_classes is not None:
            raise ValueError("num_classes given without labels: pass labels=True (dataset labels) or a tensor")
        return None, None
    if labels is True:
        if getattr(dataset, "label_problem", None):
            raise DataError(dataset.label_problem)
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise DataError("labels=True but the data has no labels (use class sub-folders or an .npz "
                            "with a 'labels' array, or pass a LongTensor)")
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (len(dataset),):
        raise ValueError(f"labels must be integers [N] = [{len(dataset)}], got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(labels.max()) >= classes:
        raise IndexError(f"labels reach {int(labels.max())} but num_classes={classes}")
    return labels, classes


def learn_settings(data, dataset, *, iterations: int, batch_size: int, seed: int, num_classes: Optional[int],
                   step: StepConfig) -> dict:
    """The ``training`` record of a task (saved in the manifest)."""
    return {"iterations": iterations, "batch_size": batch_size, "seed": int(seed), "lr": step.lr,
            "betas": list(step.betas), "r1_gamma": step.r1_gamma, "r1_convention": "gamma*E|grad|^2",
            "ema_decay": step.ema_decay, "ema_warmup": step.ema_warmup, "num_classes": num_classes,
            "step": step.to_dict(), "data": data if isinstance(data, str) else
            (str(data) if isinstance(data, os.PathLike) else type(data).__name__), "num_images": len(dataset)}


def train_task(registry: TaskRegistry, name: str, dataset, class_labels: Optional[Tensor], settings: dict, *,
               step_config: StepConfig, base_hash: str, run_g: Callable[..., Tensor], out_dir=None,
               sample_every: Optional[int] = None, checkpoint_every: Optional[int] = None,
               max_seconds: Optional[float] = None, progress: bool = True, callbacks: Sequence = (),
               plugins: Sequence[Plugin] = (), restart: bool = False) -> dict:
    """Train the (already added) task ``name``; returns the loop's metrics. The kept style set is the EMA.

    A checkpoint in ``out_dir`` is resumed only if it has the same task, base, data and settings;
    otherwise :class:`~gmem.training.ResumeMismatch` says what differs (``restart=True`` discards it).
    """
    num_classes = settings["num_classes"]
    g_params, d_params = registry.trainable(name)
    parts = GANParts(generate=lambda z, y: registry.generate(name, z, y),
                     discriminate=lambda x, y: registry.discriminate(name, x, y),
                     g_params=g_params, d_params=d_params, z_dim=registry.G.z_dim, modules=(registry.G, registry.D))
    seed = settings["seed"]
    step = GANStep(parts, RealBatches(dataset, settings["batch_size"], seed, class_labels), step_config, seed,
                   device=registry.device, plugins=plugins)
    fixed_z = torch.randn(64, registry.G.z_dim, generator=generator(seed + 12345))
    fixed_c = None if num_classes is None else torch.arange(64) % num_classes

    def samples() -> Tensor:
        with step.ema.applied():
            return run_g(fixed_z, task=name, class_ids=fixed_c)

    fingerprint = {"kind": "learn", "task": name, "base": base_hash, "data": data_fingerprint(dataset, class_labels),
                   "settings": {k: v for k, v in settings.items() if k not in _NOT_COMPARED}}
    loop = TrainLoop(step, settings["iterations"], out_dir=None if out_dir is None else Path(out_dir),
                     state_fn=lambda: dict(step.state_dict(), task=name), fingerprint=fingerprint,
                     checkpoint_every=checkpoint_every, sample_every=sample_every, sample_fn=samples,
                     max_seconds=max_seconds, progress=progress, desc=f"learn {name}", callbacks=callbacks,
                     restart=restart, resume_hint="Use another out_dir, or restart=True (CLI: --restart) to "
                                                  "discard it and train from the start.")
    metrics = loop.run()
    step.ema.copy_to_live()
    return metrics


def learn_task(memory, name: str, data, *, iterations: int, batch_size: int, seed: Optional[int], labels,
               num_classes: Optional[int], lr: float, betas, r1_gamma: float, ema_decay: float, ema_warmup: bool,
               out_dir, sample_every, checkpoint_every, max_seconds, progress: bool, callback, restart: bool,
               plugins, compress=None, **step_options) -> int:
    """:meth:`gmem.GANMemory.learn` (see there): validate, add the task, train it, remove it on failure."""
    if not isinstance(name, str) or not name or name == "source":
        raise ValueError(f"task name must be a non-empty string other than 'source', got {name!r}")
    if name in memory.records:
        raise ValueError(f"a task named {name!r} exists already; remove it first or pick another name")
    for key, value in (("iterations", iterations), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "iterations" else 1):
            kind = "non-negative" if key == "iterations" else "positive"
            raise ValueError(f"{key} must be a {kind} int, got {value!r}")
    step_config = StepConfig(**{**LEARN_DEFAULTS, "lr": lr, "betas": tuple(betas), "r1_gamma": r1_gamma,
                                "ema_decay": ema_decay, "ema_warmup": ema_warmup, **step_options})
    dataset = as_task_dataset(data, memory.size, memory.channels)
    class_labels, num_classes = task_labels(dataset, labels, num_classes)
    if seed is None:
        seed = random_seed()
    settings = learn_settings(data, dataset, iterations=iterations, batch_size=batch_size, seed=seed,
                              num_classes=num_classes, step=step_config)
    if compress is not None:  # a resumed run must compress the same way
        settings["compression"] = compress.to_dict()
    record = {"name": name, "num_classes": num_classes, "training": settings, "metrics": {}}
    class_names = getattr(dataset, "classes", None)
    if num_classes is not None and labels is True and class_names and len(class_names) == num_classes:
        record["classes"] = [str(c) for c in class_names]  # class sub-folder names
    registry = memory.registry
    registry.add(name, num_classes, record)
    try:
        plugins = list(plugins)
        if compress is not None:  # the paper's low-rank prior and knowledge base (gmem.compress.knowledge)
            styles = knowledge.begin_task(registry.G, name, registry.knowledge, compress)
            plugins.append(knowledge.make_prior(styles, compress))
        metrics = train_task(registry, name, dataset, class_labels, settings, step_config=step_config,
                             base_hash=memory.base_hash, run_g=memory.sampler.run_g, out_dir=out_dir,
                             sample_every=sample_every, checkpoint_every=checkpoint_every, max_seconds=max_seconds,
                             progress=progress, callbacks=[] if callback is None else [callback], plugins=plugins,
                             restart=restart)
        if compress is not None:
            info = knowledge.finish_task(registry.G, name, registry.knowledge, compress)
            record["compression"] = compression.compression_record(
                memory, name, {"mode": "training", **compress.to_dict()}, info)
            memory.link.knowledge_dirty = True
    except BaseException:
        registry.remove(name)
        raise
    record["metrics"].update(metrics)
    # when the task finished learning (UTC), for people browsing a memory (gmem info, gmem serve)
    record["metrics"]["learned_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return len(registry.order)
