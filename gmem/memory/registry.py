"""The task registry of a GAN memory: the converted networks, the task list, and per-task heads.

:class:`TaskRegistry` owns the converted generator and discriminator, the tasks in learning order
with their records (manifest entries), which tasks still wait on disk (lazy loading), and the
discriminator's per-task heads (:class:`DiscriminatorHeads`). It knows nothing about files or
training loops; :class:`gmem.GANMemory` combines it with the store, sampling and the trainer.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as gnn
from ..compress.knowledge import Knowledge, install_task
from ..models import Discriminator, Generator
from ..nn.bank import TaskBank

__all__ = ["TaskRegistry", "DiscriminatorHeads", "G_MODULATED", "D_MODULATED"]

# Which layers are modulated by default (globs over module names, see gmem.nn.convert).
G_MODULATED = ("fc", "resnet_*.conv_0", "resnet_*.conv_1")
D_MODULATED = ("resnet_*.conv_0", "resnet_*.conv_1")

# the head (and class ids) the discriminator's fc hands over to in this thread / context
_ACTIVE_HEAD: contextvars.ContextVar = contextvars.ContextVar("gmem_active_head", default=None)


def base_state(module: nn.Module) -> dict[str, Tensor]:
    """The unconverted state dict of a converted model (modulated layers keep ``weight``/``bias``)."""
    skip = (".weight_norm", ".weight_mean", ".weight_std")
    return {k: v for k, v in module.state_dict().items() if ".styles." not in k and not k.endswith(skip)
            and not k.startswith("styles.")}


def _layer_style_count(layer: gnn.ModulatedLayer, num_classes: Optional[int]) -> int:
    """Style values one task adds in ``layer`` (gamma, beta, bias; one bias row per class if conditional)."""
    if isinstance(layer, gnn.ModulatedConvNd):  # gamma, beta [C_out, C_in/groups] (transposed: [C_in, C_out/groups])
        return 2 * layer.weight_std.numel() + layer.out_channels
    rows = num_classes or 1
    return 2 * layer.out_features + rows * layer.out_features


class DiscriminatorHeads(TaskBank):
    """Per-task copies of the discriminator's final ``fc``: a :class:`gmem.nn.bank.TaskBank` keyed by task name.

    The same bank as the modulated layers' and per-task modules' (one task-name codec,
    :func:`gmem.nn.bank.encode_task`), so every name :func:`gmem.nn.add_task` accepts works here too.
    The discriminator itself is never modified: a forward hook on its ``fc`` hands the features over
    to the active task's head inside :meth:`active` (a per-thread context, so concurrent callers with
    different tasks do not interfere) and picks each sample's class logit. The base ``fc`` is the
    source's head and is not trained.
    """

    bank_attr = "heads"

    def __init__(self, D: Discriminator):
        super().__init__()
        self._init_bank()
        self._base = [D.fc]  # a list: the base fc belongs to D, not to this module's parameters
        D.fc.register_forward_hook(self._hook)

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    def __contains__(self, task: str) -> bool:
        return task != "source" and task in self.task_names

    def __getitem__(self, task: str) -> nn.Linear:
        if task not in self:
            raise KeyError(f"no discriminator head for task {task!r}")
        return self.entry(self.task_names.index(task))

    def names(self) -> list[str]:
        return self.task_names[1:]

    def make_entry(self, name: str, init: int = 0, num_classes: Optional[int] = None) -> nn.Linear:
        """A new head initialised from the base (row 0 repeated per class if conditional)."""
        base = self.base
        rows = num_classes or base.out_features
        fc = nn.Linear(base.in_features, rows, bias=base.bias is not None).to(base.weight.device)
        with torch.no_grad():
            fc.weight.copy_(base.weight if rows == base.out_features else base.weight[:1].expand(rows, -1))
            if base.bias is not None:
                fc.bias.copy_(base.bias if rows == base.out_features else base.bias[:1].expand(rows))
        return fc

    def add(self, task: str, num_classes: Optional[int] = None) -> nn.Linear:
        """A new head for ``task`` initialised from the base (row 0 repeated per class if conditional)."""
        fc = self.make_entry(task, num_classes=num_classes)
        self.add_entry(task, fc)
        return fc

    def remove(self, task: str) -> None:
        if task in self:
            self.remove_entry(self.task_names.index(task))

    def _hook(self, module, inputs, output):
        active = _ACTIVE_HEAD.get()
        if active is None or active[0] is not module:
            return None
        _, head, class_ids = active
        logits = head(inputs[0])                                       # [N, classes]
        ids = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device) if class_ids is None \
            else class_ids.to(logits.device).long()
        return logits.gather(1, ids.view(-1, 1))                       # [N, 1]: D then takes column 0

    @contextlib.contextmanager
    def active(self, task: str, class_ids: Optional[Tensor] = None):
        """Inside the block, ``D(x)`` (no labels) uses ``task``'s head with ``class_ids [N]`` (default 0)."""
        token = _ACTIVE_HEAD.set((self.base, self[task], class_ids))
        try:
            yield
        finally:
            _ACTIVE_HEAD.reset(token)


class TaskRegistry:
    """Converted ``(G, D)`` plus the task list. ``G``/``D`` are taken as they are (copy them first)."""

    def __init__(self, G: Generator, D: Discriminator, *, g_include=G_MODULATED, d_include=D_MODULATED,
                 d_fc_per_task: bool = True):
        for p in list(G.parameters()) + list(D.parameters()):
            p.requires_grad_(False)
        self.conversion = {"generator": list(g_include), "discriminator": list(d_include),
                           "discriminator_fc_per_task": bool(d_fc_per_task)}
        self.g_converted = gnn.convert(G, include=list(g_include))
        self.d_converted = gnn.convert(D, include=list(d_include))
        if d_fc_per_task and "fc" in self.d_converted:
            raise ValueError("d_fc_per_task=True but the discriminator's fc is modulated too: choose one")
        self.G, self.D = G, D
        self.heads = DiscriminatorHeads(D)
        self.order: list[str] = []               # task names in learning order
        self.records: dict[str, dict] = {}       # manifest entries per task
        self.pending: dict[str, Path] = {}       # tasks on disk not read yet -> file
        self.knowledge = Knowledge()             # knowledge bases of the generator's compressed convs
        self.device = torch.device("cpu")

    def to(self, device) -> None:
        self.device = torch.device(device)
        self.G.to(self.device)
        self.D.to(self.device)
        self.heads.to(self.device)
        self.knowledge.to(self.device)

    # ------------------------------------------------------------------ names
    def record(self, task: str) -> dict:
        if not isinstance(task, str):
            raise TypeError(f"task must be a task name, got {type(task).__name__}")
        if task not in self.records:
            raise KeyError(f"unknown task {task!r}; this memory has tasks {list(self.order)} (and 'source')")
        return self.records[task]

    def name(self, task) -> str:
        """A task name from a name or a position (0 = source, k = k-th learned task)."""
        if isinstance(task, bool) or not isinstance(task, (str, int)):
            raise TypeError(f"task must be a name or an index, got {type(task).__name__}")
        if isinstance(task, int):
            if not 0 <= task <= len(self.order):
                raise IndexError(f"task index {task} out of range: 0 (source) .. {len(self.order)}")
            return "source" if task == 0 else self.order[task - 1]
        if task != "source":
            self.record(task)
        return task

    def num_classes(self, task: str) -> Optional[int]:
        return None if task == "source" else self.record(task).get("num_classes")

    # ------------------------------------------------------------------ adding and removing tasks
    def add(self, task: str, num_classes: Optional[int], record: dict) -> None:
        """A new task (initialised from the source) in both networks, its head, and its record."""
        gnn.add_task(self.G, task, num_classes=num_classes)
        gnn.add_task(self.D, task)
        if self.conversion["discriminator_fc_per_task"]:
            self.heads.add(task, num_classes)
        self.order.append(task)
        self.records[task] = record

    def add_pending(self, task: str, record: dict, file: Path) -> None:
        """A task of a store, known by its ``record`` (manifest entry), read from ``file`` on first use."""
        self.order.append(task)
        self.records[task] = record
        self.pending[task] = file

    def stored_at(self, task: str, file: str, sha256: str) -> None:
        """``task`` was written to ``file`` with that SHA-256: its record says so (and, while it is still
        pending, it is read from there)."""
        self.record(task).update({"file": file, "sha256": sha256})

    def move_pending(self, task: str, file: Path) -> None:
        """A pending task is now read from ``file`` (the store it was saved to)."""
        if task not in self.pending:
            raise KeyError(f"task {task!r} is not pending")
        self.pending[task] = file

    def loaded(self, task: str) -> None:
        """A pending task's file has been read into the networks (:meth:`install`)."""
        del self.pending[task]

    def install(self, task: str, tensors: dict[str, Tensor], num_classes: Optional[int]) -> None:
        """Add ``task`` to the networks' banks and fill it from ``tensors`` (the task file's layout)."""
        if num_classes is not None and num_classes > 1 and not any(t.ndim and t.shape[0] == num_classes
                                                                   for t in tensors.values()):
            # checked before anything is allocated: a manifest's num_classes sizes the new style rows
            raise ValueError(f"num_classes={num_classes} matches no per-class tensor of the task file")
        g_state = {k[2:]: v for k, v in tensors.items() if k.startswith("G.")}
        d_state = {k[2:]: v for k, v in tensors.items() if k.startswith("D.")}
        gnn.add_task(self.G, task, num_classes=num_classes)
        gnn.add_task(self.D, task)
        try:
            g_state = install_task(self.G, task, g_state, self.knowledge)  # compressed convs, if any
            gnn.load_style_state_dict(self.G, task, g_state)
            gnn.load_style_state_dict(self.D, task, d_state)
            if self.conversion["discriminator_fc_per_task"]:
                fc = self.heads.add(task, num_classes)
                w, b = tensors.get("Dfc.weight"), tensors.get("Dfc.bias")
                if w is None or w.shape != fc.weight.shape or (b is not None and b.shape != fc.bias.shape):
                    raise ValueError("discriminator head Dfc.weight has the wrong shape or is missing")
                with torch.no_grad():
                    fc.weight.copy_(w)
                    if b is not None:
                        fc.bias.copy_(b)
        except BaseException:
            self._uninstall(task)
            raise

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        """Everything a (loaded) task owns: ``G.<layer>.<group>``, ``D.<layer>.<group>``, ``Dfc.weight/bias``."""
        out = {f"G.{k}": v.cpu().contiguous() for k, v in gnn.style_state_dict(self.G, task).items()}
        out.update({f"D.{k}": v.cpu().contiguous() for k, v in gnn.style_state_dict(self.D, task).items()})
        if task in self.heads:
            fc = self.heads[task]
            out["Dfc.weight"] = fc.weight.detach().cpu().clone()
            if fc.bias is not None:
                out["Dfc.bias"] = fc.bias.detach().cpu().clone()
        return out

    def remove(self, task: str, keep_record: bool = False) -> None:
        """Forget a task (its style sets, head and record); the other tasks are untouched.

        ``keep_record``: only take a loaded task out of the networks again (a task file that did not fit).
        """
        self.record(task)
        self._uninstall(task, from_networks=keep_record or task not in self.pending)
        if keep_record:
            return
        self.pending.pop(task, None)
        self.order.remove(task)

    def uninstall(self, task: str) -> None:
        """Take a task :meth:`install` put in the networks out again (no record kept: e.g. a trial install)."""
        self._uninstall(task)

    def _uninstall(self, task: str, from_networks: bool = True) -> None:
        """Take ``task`` out of the knowledge bases, the networks' banks (``from_networks``; a task never
        read is not in them) and the heads. The bases go first: they refuse (ValueError naming them)
        while later tasks use the task's columns, and then nothing has changed."""
        if task in self.knowledge:
            self.knowledge.remove_task(task)
        if from_networks:
            gnn.remove_task(self.G, task)
            gnn.remove_task(self.D, task)
        self.heads.remove(task)
        self.records.pop(task, None)

    # ------------------------------------------------------------------ running a task
    def trainable(self, task: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(generator params, discriminator params)`` that learning ``task`` changes (styles + head)."""
        params = getattr(gnn, "trainable_parameters", gnn.style_parameters)
        d_params = params(self.D, task) + (list(self.heads[task].parameters()) if task in self.heads else [])
        return params(self.G, task), d_params

    def generate(self, task: str, z: Tensor, class_ids: Optional[Tensor] = None) -> Tensor:
        """``G(z)`` ``[N, C, H, W]`` as ``task`` (with gradients; ``class_ids [N]`` for a conditional task)."""
        with gnn.use_task(self.G, task), gnn.use_classes(self.G, class_ids):
            return self.G(z)

    def discriminate(self, task: str, x: Tensor, class_ids: Optional[Tensor] = None) -> Tensor:
        """Logits ``[N]`` of ``x`` under ``task``'s style set and head (class ``class_ids [N]``, default 0)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(gnn.use_task(self.D, task))
            if task != "source" and task in self.heads:
                stack.enter_context(self.heads.active(task, class_ids))
                return self.D(x)
            return self.D(x, class_ids)

    @contextlib.contextmanager
    def discriminator_as(self, task: str):
        """The discriminator with ``task``'s style set selected (``D(x)`` then uses its head too)."""
        with gnn.use_task(self.D, task), contextlib.ExitStack() as stack:
            if task != "source" and task in self.heads:
                stack.enter_context(self.heads.active(task))
            yield self.D

    # ------------------------------------------------------------------ accounting
    def parameter_counts(self, task: Optional[str] = None) -> dict:
        """Base sizes and what one task adds; see :meth:`gmem.GANMemory.parameter_counts`."""
        classes = None if task is None else self.num_classes(self.name(task))
        g_base = sum(v.numel() for v in base_state(self.G).values() if v.is_floating_point())
        d_base = sum(v.numel() for v in base_state(self.D).values() if v.is_floating_point())
        g_style = sum(_layer_style_count(m, classes) for _, m in gnn.modulated_layers(self.G))
        d_style = sum(_layer_style_count(m, None) for _, m in gnn.modulated_layers(self.D))
        d_fc = 0
        if self.conversion["discriminator_fc_per_task"]:
            fc = self.heads.base
            rows = classes or fc.out_features
            d_fc = rows * fc.in_features + (rows if fc.bias is not None else 0)
        g_stored = g_style
        if task is not None and self.name(task) in self.knowledge:  # compressed: what its bases store
            name = self.name(task)
            g_stored += self.knowledge.stored_values(name) - self.knowledge.dense_values(name)
        return {"generator_base": g_base, "discriminator_base": d_base, "generator_style": g_style,
                "generator_stored": g_stored, "generator_style_ratio": g_style / g_base, "discriminator_style": d_style,
                "discriminator_fc": d_fc, "total": g_style + d_style + d_fc}

    def layer_names(self) -> list[str]:
        """Names of the generator's modulated layers (for ``interpolate(layers=...)``)."""
        return [name for name, _ in gnn.modulated_layers(self.G)]
