"""GAN memory: a frozen GP-GAN base plus one small style set per learned task (no forgetting).

    mem = GANMemory.default()                      # embedded 32x32 base, no tasks yet
    mem.learn("emoji", "emoji", iterations=2000)   # directory / .npz / Dataset / float tensor
    x = mem.sample("emoji", 16, seed=0)            # [16, 3, 32, 32] in [-1, 1]
    x = mem.sample(["emoji", "source"] * 8, seed=0)          # one forward, mixed tasks (replay)
    x = mem.interpolate("emoji", "icons", 0.5, 8, seed=0)    # style interpolation
    mem.save("my_memory");  mem = GANMemory.load("my_memory")

Conversion (the paper's released code, configurable through ``from_base``): the generator's ``fc`` and
every block's ``conv_0``/``conv_1`` are modulated (mFiLM / mAdaFM); the 1x1 shortcuts ``conv_s``,
``conv_img`` and the label embedding stay frozen and shared. In the discriminator the block convs are
modulated and ``fc`` is trained per task (a full copy of that small layer per task).

Training a task (:meth:`GANMemory.learn`) only touches that task's style parameters, so every earlier
task's samples stay bit for bit what they were. On disk (:meth:`save` / :meth:`load`) a memory is a
directory with ``manifest.json`` and one safetensors file per task (content-addressed names, each
written atomically, unchanged files never rewritten); tasks are read lazily on first use and a
missing or damaged file names itself in the error without affecting the other tasks.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nn as gnn
from .data import DataError, InfiniteSampler, as_dataset, batch
from .models import CheckpointError, Discriminator, Generator, load_base, load_default_base, save_base
from . import store
from .store import FORMAT, MANIFEST, TASK_FORMAT, TaskFileError
from .train_base import atomic_torch_save, augment, r1_penalty, save_grid, update_ema

__all__ = ["GANMemory", "TaskFileError", "G_MODULATED", "D_MODULATED"]

# Which layers are modulated by default (globs over module names, see gmem.nn.convert).
G_MODULATED = ("fc", "resnet_*.conv_0", "resnet_*.conv_1")
D_MODULATED = ("resnet_*.conv_0", "resnet_*.conv_1")

CHECKPOINT = "checkpoint.pt"

TaskRef = Union[str, int]


# ------------------------------------------------------------------------------------- helpers
def state_hash(*named_states: tuple[str, dict]) -> str:
    """SHA-256 of state dicts' float32 contents (keys, shapes and values), independent of file format."""
    h = hashlib.sha256()
    for prefix, state in named_states:
        for key in sorted(state):
            t = state[key].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{prefix}{key}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _base_state(module: nn.Module) -> dict[str, Tensor]:
    """The unconverted state dict of a converted model (modulated layers keep ``weight``/``bias``)."""
    skip = (".weight_norm", ".weight_mean", ".weight_std")
    return {k: v for k, v in module.state_dict().items() if ".styles." not in k and not k.endswith(skip)
            and not k.startswith("styles.")}


def _layer_style_count(layer: gnn.ModulatedLayer, num_classes: Optional[int]) -> int:
    """Style values one task adds in ``layer`` (gamma, beta, bias; one bias row per class if conditional)."""
    if isinstance(layer, gnn.ModulatedConv2d):
        return 2 * layer.out_channels * layer.in_channels + layer.out_channels
    rows = num_classes or 1
    return 2 * layer.out_features + rows * layer.out_features


# ------------------------------------------------------------------------------------- memory
class GANMemory:
    """A converted GP-GAN pair with a bank of tasks. See the module docstring for the workflow.

    Attributes: ``generator`` / ``discriminator`` (the converted networks; :mod:`gmem.nn` functions
    apply to them), ``tasks`` (learned task names in order, without ``"source"``), ``base_hash``
    (SHA-256 of the base weights), ``records`` (per-task manifest entries: classes, training
    settings, metrics).
    """

    def __init__(self, G: Generator, D: Discriminator, *, g_include=G_MODULATED, d_include=D_MODULATED,
                 d_fc_per_task: bool = True, base_source: Optional[dict] = None):
        if not isinstance(G, Generator) or not isinstance(D, Discriminator):
            raise TypeError("GANMemory needs a gmem.models.Generator and Discriminator "
                            f"(got {type(G).__name__}, {type(D).__name__})")
        if G.size != D.size or G.channels != D.channels:
            raise ValueError(f"generator ({G.size}px, {G.channels} ch) and discriminator ({D.size}px, "
                             f"{D.channels} ch) do not match")
        G, D = copy.deepcopy(G).cpu().eval(), copy.deepcopy(D).cpu().eval()
        self.base_hash = state_hash(("G.", G.state_dict()), ("D.", D.state_dict()))
        self.base_source = dict(base_source or {"kind": "custom"})
        self.conversion = {"generator": list(g_include), "discriminator": list(d_include),
                           "discriminator_fc_per_task": bool(d_fc_per_task)}
        for p in list(G.parameters()) + list(D.parameters()):
            p.requires_grad_(False)
        self.g_converted = gnn.convert(G, include=list(g_include))
        self.d_converted = gnn.convert(D, include=list(d_include))
        if d_fc_per_task and "fc" in self.d_converted:
            raise ValueError("d_fc_per_task=True but the discriminator's fc is modulated too: choose one")
        self._G, self._D = G, D
        self._d_fc_base = D.fc
        self._d_fc: dict[str, nn.Linear] = {}     # per-task copies of D.fc (d_fc_per_task)
        self._order: list[str] = []               # task names in learning order
        self.records: dict[str, dict] = {}        # manifest entries per task
        self._pending: dict[str, Path] = {}       # tasks on disk not read yet -> file
        self._directory: Optional[Path] = None    # where the memory was loaded from / saved to
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, G: Generator, D: Discriminator, **conversion) -> "GANMemory":
        """A memory on the base ``(G, D)`` (copied; the originals are left as they are), no tasks yet.

        ``conversion``: ``g_include`` / ``d_include`` (globs of layers to modulate; defaults
        :data:`G_MODULATED`, :data:`D_MODULATED`), ``d_fc_per_task`` (default True).
        """
        return cls(G, D, **conversion)

    @classmethod
    def default(cls, **conversion) -> "GANMemory":
        """The embedded pretrained 32x32 base (``gmem/assets/base``), no tasks yet."""
        from .models import default_base_info

        G, D = load_default_base()
        info = default_base_info()
        return cls(G, D, base_source={"kind": "default", "file_sha256": info.get("sha256")}, **conversion)

    def to(self, device) -> "GANMemory":
        """Move the networks (and every per-task discriminator head) to ``device``."""
        self.device = torch.device(device)
        self._G.to(self.device)
        self._D.to(self.device)
        for fc in self._d_fc.values():
            fc.to(self.device)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def generator(self) -> Generator:
        return self._G

    @property
    def discriminator(self) -> Discriminator:
        return self._D

    @property
    def tasks(self) -> list[str]:
        """Learned task names, in the order they were learned (``"source"`` excluded)."""
        return list(self._order)

    @property
    def size(self) -> int:
        return self._G.size

    @property
    def channels(self) -> int:
        return self._G.channels

    @property
    def z_dim(self) -> int:
        return self._G.z_dim

    def num_classes(self, task: str) -> Optional[int]:
        """Classes of a conditional task (None for an unconditional one or the source)."""
        if task == "source":
            return None
        return self._record(task).get("num_classes")

    def __repr__(self) -> str:
        return (f"GANMemory(size={self.size}, nf={self._G.nf}, tasks={self.tasks}, "
                f"base={self.base_source.get('kind')}:{self.base_hash[:12]})")

    # ------------------------------------------------------------------ task bookkeeping
    def _record(self, task: str) -> dict:
        if not isinstance(task, str):
            raise TypeError(f"task must be a task name, got {type(task).__name__}")
        if task not in self.records:
            raise KeyError(f"unknown task {task!r}; this memory has tasks {self.tasks} (and 'source')")
        return self.records[task]

    def _name(self, task: TaskRef) -> str:
        """A task name from a name or a position (0 = source, k = k-th learned task)."""
        if isinstance(task, bool) or not isinstance(task, (str, int)):
            raise TypeError(f"task must be a name or an index, got {type(task).__name__}")
        if isinstance(task, int):
            if not 0 <= task <= len(self._order):
                raise IndexError(f"task index {task} out of range: 0 (source) .. {len(self._order)}")
            return "source" if task == 0 else self._order[task - 1]
        if task != "source":
            self._record(task)
        return task

    def _ensure_loaded(self, task: str) -> None:
        """Read a task's file on first use (lazy loading), checked by :func:`gmem.store.read_task`; errors name the file."""
        if task == "source" or task not in self._pending:
            return
        tensors = store.read_task(self._directory, task, self.records[task])
        try:
            self._install_task(task, tensors, self.records[task].get("num_classes"))
        except (KeyError, ValueError) as e:
            raise TaskFileError(f"task {task!r}: {self._pending[task]} does not fit this base: {e}") from None
        del self._pending[task]

    def _install_task(self, task: str, tensors: dict[str, Tensor], num_classes: Optional[int]) -> None:
        """Add ``task`` to the networks' banks and fill it from ``tensors`` (the task file's layout)."""
        g_state = {k[2:]: v for k, v in tensors.items() if k.startswith("G.")}
        d_state = {k[2:]: v for k, v in tensors.items() if k.startswith("D.")}
        gnn.add_task(self._G, task, num_classes=num_classes)
        gnn.add_task(self._D, task)
        try:
            gnn.load_style_state_dict(self._G, task, g_state)
            gnn.load_style_state_dict(self._D, task, d_state)
            if self.conversion["discriminator_fc_per_task"]:
                fc = self._new_d_fc(num_classes)
                w, b = tensors.get("Dfc.weight"), tensors.get("Dfc.bias")
                if w is None or w.shape != fc.weight.shape or (b is not None and b.shape != fc.bias.shape):
                    raise ValueError(f"discriminator head Dfc.weight has the wrong shape or is missing")
                with torch.no_grad():
                    fc.weight.copy_(w)
                    if b is not None:
                        fc.bias.copy_(b)
                self._d_fc[task] = fc
        except BaseException:
            gnn.remove_task(self._G, task)
            gnn.remove_task(self._D, task)
            raise

    def _task_tensors(self, task: str) -> dict[str, Tensor]:
        """Everything a task owns: ``G.<layer>.<group>``, ``D.<layer>.<group>``, ``Dfc.weight/bias``."""
        self._ensure_loaded(task)
        out = {f"G.{k}": v.cpu().contiguous() for k, v in gnn.style_state_dict(self._G, task).items()}
        out.update({f"D.{k}": v.cpu().contiguous() for k, v in gnn.style_state_dict(self._D, task).items()})
        if task in self._d_fc:
            fc = self._d_fc[task]
            out["Dfc.weight"] = fc.weight.detach().cpu().clone()
            if fc.bias is not None:
                out["Dfc.bias"] = fc.bias.detach().cpu().clone()
        return out

    def _new_d_fc(self, num_classes: Optional[int]) -> nn.Linear:
        """A per-task discriminator head initialised from the base's (row 0 repeated per class)."""
        base = self._d_fc_base
        rows = num_classes or base.out_features
        fc = nn.Linear(base.in_features, rows, bias=base.bias is not None).to(base.weight.device)
        with torch.no_grad():
            src_w = base.weight if rows == base.out_features else base.weight[:1].expand(rows, -1)
            fc.weight.copy_(src_w)
            if base.bias is not None:
                fc.bias.copy_(base.bias if rows == base.out_features else base.bias[:1].expand(rows))
        return fc

    @contextlib.contextmanager
    def _d_head(self, task: str):
        """The discriminator as ``task`` sees it: its style set and (per-task) fc head."""
        D = self._D
        saved_fc, saved_nlabels = D.fc, D.nlabels
        try:
            if task != "source" and task in self._d_fc:
                D.fc = self._d_fc[task]
                D.nlabels = D.fc.out_features
            with gnn.use_task(D, task):
                yield D
        finally:
            D.fc, D.nlabels = saved_fc, saved_nlabels

    def remove(self, task: str) -> None:
        """Forget a task (its style sets and head); the other tasks are untouched."""
        self._record(task)
        if task not in self._pending:
            gnn.remove_task(self._G, task)
            gnn.remove_task(self._D, task)
        self._pending.pop(task, None)
        self._d_fc.pop(task, None)
        self._order.remove(task)
        del self.records[task]

    # ------------------------------------------------------------------ latents / labels
    def latents(self, n: int, seed: Optional[int] = None) -> Tensor:
        """``z [n, z_dim]``: standard normal; with ``seed`` always the same values for the same seed."""
        if seed is None:
            return torch.randn(n, self.z_dim)
        return torch.randn(n, self.z_dim, generator=torch.Generator().manual_seed(int(seed)))

    def _z(self, n: Optional[int], z: Optional[Tensor], seed: Optional[int]) -> Tensor:
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

    def _class_ids(self, names: list[str], labels, n: int) -> Optional[Tensor]:
        """Per-sample class ids for conditional tasks (checked), zeros elsewhere; None if none is conditional."""
        classes = [self.num_classes(t) for t in names]
        if labels is None:
            if not any(classes):
                return None
            return torch.tensor([i % c if c else 0 for i, c in enumerate(classes)], dtype=torch.long)
        labels = torch.as_tensor(labels)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (n,):
            raise ValueError(f"labels must be integers, one per sample [{n}], got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
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
        """Images ``[n, C, H, W]`` in [-1, 1] from ``task`` (``"source"`` = the base).

        ``task`` may be a list with one task per sample: the whole batch then runs in one forward
        (mixed-task batch, e.g. generative replay). ``z [n, z_dim]`` or ``seed`` fix the latents
        (same seed, same images). ``labels``: class per sample for conditional tasks (default
        ``i % num_classes``); for the source, labels of a conditional base. Runs in chunks of
        ``batch_size``.
        """
        if isinstance(task, (list, tuple)):
            names = [self._name(t) for t in task]
            if n is not None and n != len(names):
                raise ValueError(f"n={n} but {len(names)} tasks were given (one per sample)")
            n = len(names)
        else:
            names = None
            single = self._name(task)
        z = self._z(n, z, seed)
        n = z.shape[0]
        if names is None:
            names = [single] * n
        for t in dict.fromkeys(names):
            self._ensure_loaded(t)
        if all(t == "source" for t in names):
            y = None if labels is None else torch.as_tensor(labels).long()
            return self._run_g(z, y=y, batch_size=batch_size)
        class_ids = self._class_ids(names, labels, n)
        if len(set(names)) == 1:
            return self._run_g(z, task=names[0], class_ids=class_ids, batch_size=batch_size)
        return self._run_g(z, task_list=names, class_ids=class_ids, batch_size=batch_size)

    def sample_mixed(self, tasks: Sequence[TaskRef], z: Optional[Tensor] = None, seed: Optional[int] = None,
                     labels=None, batch_size: int = 64) -> Tensor:
        """One sample per entry of ``tasks`` (names or indices) in one forward: generative replay.

        Same as ``sample(list(tasks), ...)``; returns ``[len(tasks), C, H, W]``.
        """
        return self.sample(list(tasks), z=z, seed=seed, labels=labels, batch_size=batch_size)

    def _run_g(self, z: Tensor, task: Optional[str] = None, task_list: Optional[list[str]] = None,
               class_ids: Optional[Tensor] = None, y: Optional[Tensor] = None, batch_size: int = 64,
               ctx=None) -> Tensor:
        G = self._G
        was_training = G.training
        G.eval()
        out = []
        try:
            for s in range(0, z.shape[0], max(1, batch_size)):
                zs = z[s:s + batch_size].to(self.device)
                ys = None if y is None else y[s:s + batch_size].to(self.device)
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
        return torch.cat(out) if out else z.new_zeros(0, self.channels, self.size, self.size)

    @torch.no_grad()
    def interpolate(self, task_a: TaskRef, task_b: TaskRef, lam: Union[float, Sequence[float]], n: Optional[int] = None,
                    seed: Optional[int] = None, z: Optional[Tensor] = None, groups=("gamma", "beta", "bias"),
                    layers=None, labels=None, batch_size: int = 64) -> Tensor:
        """Samples of the style set ``(1 - lam) * task_a + lam * task_b`` for fixed latents.

        ``lam``: a number -> ``[n, C, H, W]``; a sequence -> ``[len(lam), n, C, H, W]`` (same z in each).
        ``groups``: which parameter groups mix (``"gamma"``/``"scale"``, ``"beta"``/``"shift"``,
        ``"bias"``); the rest stay at task_a (the paper's Figure 2). ``layers``: globs over generator
        layer names (e.g. ``"fc"``, ``"resnet_0_0.*"``) choosing which blocks mix (Figure 3);
        see :meth:`layer_names`.
        """
        a, b = self._name(task_a), self._name(task_b)
        self._ensure_loaded(a)
        self._ensure_loaded(b)
        z = self._z(n, z, seed)
        class_ids = self._class_ids([a] * z.shape[0], labels, z.shape[0])
        lams = [lam] if isinstance(lam, (int, float)) else list(lam)
        outs = []
        for value in lams:
            ctx = lambda value=value: gnn.interpolate(self._G, a, b, float(value), groups=groups, layers=layers)
            outs.append(self._run_g(z, class_ids=class_ids, batch_size=batch_size, ctx=ctx))
        return outs[0] if isinstance(lam, (int, float)) else torch.stack(outs)

    def layer_names(self) -> list[str]:
        """Names of the generator's modulated layers (for ``interpolate(layers=...)``)."""
        return [name for name, _ in gnn.modulated_layers(self._G)]

    # ------------------------------------------------------------------ parameter accounting
    def parameter_counts(self, task: Optional[str] = None) -> dict:
        """Parameter accounting: base sizes and what one task adds (style values vs the base).

        Returns ``generator_base``, ``discriminator_base`` (frozen weights), and for ``task`` (or an
        unconditional task if None) ``generator_style``, ``generator_style_ratio`` (the paper reports
        ~20% at 256px), ``discriminator_style``, ``discriminator_fc`` and ``total``.
        """
        classes = None if task is None else self.num_classes(self._name(task))
        g_base = sum(v.numel() for v in _base_state(self._G).values() if v.is_floating_point())
        d_base = sum(v.numel() for v in _base_state(self._D).values() if v.is_floating_point())
        g_style = sum(_layer_style_count(l, classes) for _, l in gnn.modulated_layers(self._G))
        d_style = sum(_layer_style_count(l, None) for _, l in gnn.modulated_layers(self._D))
        d_fc = 0
        if self.conversion["discriminator_fc_per_task"]:
            fc = self._d_fc_base
            rows = classes or fc.out_features
            d_fc = rows * fc.in_features + (rows if fc.bias is not None else 0)
        return {"generator_base": g_base, "discriminator_base": d_base, "generator_style": g_style,
                "generator_style_ratio": g_style / g_base, "discriminator_style": d_style,
                "discriminator_fc": d_fc, "total": g_style + d_style + d_fc}

    # ------------------------------------------------------------------ learning
    def learn(self, name: str, data, iterations: int = 1000, batch_size: int = 16, seed: Optional[int] = None, *,
              labels=None, num_classes: Optional[int] = None, lr: float = 1e-4, betas=(0.0, 0.99),
              r1_gamma: float = 10.0, ema_decay: float = 0.999, ema_warmup: bool = True,
              out_dir=None, sample_every: Optional[int] = None, checkpoint_every: Optional[int] = None,
              max_seconds: Optional[float] = None, progress: bool = True, callback=None) -> int:
        """Learn task ``name`` from ``data``; returns its index (1 = first learned task, 0 = source).

        The index is the task's position in :attr:`tasks` plus one, which :meth:`sample` accepts; with
        :mod:`gmem.nn` functions on :attr:`generator` use the task's name (tasks of a loaded memory join
        the networks' banks in the order they are first used).

        ``data``: a directory of images, an .npy/.npz file, an embedded demo set name, a Dataset, or a
        float tensor ``[N, C, H, W]`` in [-1, 1] at the memory's resolution (folders and arrays are
        resized). Only this task's style parameters (generator and discriminator) and its
        discriminator head are trained, with the GP-GAN objective: non-saturating loss, R1 on real data
        (``r1_gamma``), Adam(``lr``, ``betas``), horizontal flips + uniform dequantisation noise. The
        generator's style set kept for sampling is an EMA (``ema_decay``) of the trained one; with
        ``ema_warmup`` the decay is ``min(ema_decay, (1 + t) / (10 + t))`` at step t so short runs are
        not dominated by the initialisation. Everything random comes from ``seed`` (random if None;
        recorded).

        Conditional task: ``labels=True`` uses the dataset's labels (class sub-folders, an .npz
        ``labels`` array), or pass a LongTensor ``[N]``; the generator's fc gets one bias per class
        and the discriminator head one output per class. ``num_classes`` defaults to ``max + 1``.

        ``out_dir``: progress files: ``samples/it_XXXXXXX.png`` grids (EMA generator, fixed z) every
        ``sample_every`` iterations, and ``checkpoint.pt`` every ``checkpoint_every`` (default: every
        ``max(50, iterations // 10)``) and at the end; if a checkpoint of the same task and settings is
        there, training resumes from it (the result equals an uninterrupted run). ``max_seconds``
        stops early (the task keeps what it learned). ``callback(iteration, losses)`` is called after
        each step. If learning fails or is interrupted, the task is removed from the memory again.
        """
        store.validate_task_name(name)
        if name in self.records:
            raise ValueError(f"a task named {name!r} exists already; remove it first or pick another name")
        for key, value in (("iterations", iterations), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "iterations" else 1):
                raise ValueError(f"{key} must be a {'non-negative' if key == 'iterations' else 'positive'} int, got {value!r}")
        dataset = self._dataset(data)
        class_labels, num_classes = self._task_labels(dataset, labels, num_classes)
        if seed is None:
            seed = secrets.randbelow(2**31)
        settings = {"iterations": iterations, "batch_size": batch_size, "seed": int(seed), "lr": lr,
                    "betas": list(betas), "r1_gamma": r1_gamma, "ema_decay": ema_decay, "ema_warmup": ema_warmup,
                    "num_classes": num_classes, "data": data if isinstance(data, str) else
                    (str(data) if isinstance(data, os.PathLike) else type(data).__name__),
                    "num_images": len(dataset)}
        gnn.add_task(self._G, name, num_classes=num_classes)
        gnn.add_task(self._D, name)
        if self.conversion["discriminator_fc_per_task"]:
            self._d_fc[name] = self._new_d_fc(num_classes)
        self._order.append(name)
        self.records[name] = {"name": name, "num_classes": num_classes, "training": settings, "metrics": {}}
        class_names = getattr(dataset, "classes", None)
        if num_classes is not None and labels is True and class_names and len(class_names) == num_classes:
            self.records[name]["classes"] = [str(c) for c in class_names]  # class sub-folder names
        try:
            metrics = self._train(name, dataset, class_labels, settings, out_dir=out_dir, sample_every=sample_every,
                                  checkpoint_every=checkpoint_every, max_seconds=max_seconds, progress=progress,
                                  callback=callback)
        except BaseException:
            self.remove(name)
            raise
        self.records[name]["metrics"].update(metrics)
        return len(self._order)

    def _dataset(self, data):
        if isinstance(data, Tensor) and data.is_floating_point():
            if data.ndim != 4:
                raise DataError(f"image tensor must be [N, C, H, W], got {tuple(data.shape)}")
            if tuple(data.shape[-2:]) != (self.size, self.size):
                raise DataError(f"wrong resolution: images are {data.shape[-2]}x{data.shape[-1]}, this memory's "
                                f"base is {self.size}x{self.size} (resize the tensor, or pass a folder/array file, "
                                "which are resized automatically)")
            if data.shape[1] not in (1, self.channels):
                raise DataError(f"images have {data.shape[1]} channels, the base has {self.channels}")
        return as_dataset(data, self.size, self.channels)

    @staticmethod
    def _task_labels(dataset, labels, num_classes) -> tuple[Optional[Tensor], Optional[int]]:
        if labels is None or labels is False:
            if num_classes is not None:
                raise ValueError("num_classes given without labels: pass labels=True (dataset labels) or a tensor")
            return None, None
        if labels is True:
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

    def _train(self, name, dataset, class_labels, settings, *, out_dir, sample_every, checkpoint_every,
               max_seconds, progress, callback) -> dict:
        from tqdm import tqdm

        G, D, dev = self._G, self._D, self.device
        iterations, bs, seed = settings["iterations"], settings["batch_size"], settings["seed"]
        num_classes, gamma = settings["num_classes"], settings["r1_gamma"]
        g_params = gnn.style_parameters(G, name)
        d_params = gnn.style_parameters(D, name) + (list(self._d_fc[name].parameters()) if name in self._d_fc else [])
        g_live = nn.ParameterList(g_params)
        g_ema = nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=False) for p in g_params])
        opt_g = torch.optim.Adam(g_params, lr=settings["lr"], betas=tuple(settings["betas"]), eps=1e-8)
        opt_d = torch.optim.Adam(d_params, lr=settings["lr"], betas=tuple(settings["betas"]), eps=1e-8)
        sampler = InfiniteSampler(len(dataset), bs, seed)
        rng = torch.Generator().manual_seed(seed + 1)  # z, fake labels, flips, dequantisation noise
        iteration, elapsed = 0, 0.0

        out_dir = Path(out_dir) if out_dir is not None else None
        ckpt_path = out_dir / CHECKPOINT if out_dir is not None else None
        checkpoint_every = checkpoint_every or max(50, iterations // 10)
        sample_every = sample_every or max(100, iterations // 10)
        resume_keys = ("batch_size", "seed", "lr", "betas", "r1_gamma", "ema_decay", "ema_warmup", "num_classes")

        def state() -> dict:
            return {"task": name, "iteration": iteration, "elapsed": elapsed,
                    "settings": {k: settings[k] for k in resume_keys},
                    "g_live": [p.detach().clone() for p in g_params], "g_ema": [p.detach().clone() for p in g_ema],
                    "d_live": [p.detach().clone() for p in d_params], "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(), "sampler": sampler.state_dict(), "rng": rng.get_state()}

        if ckpt_path is not None and ckpt_path.is_file():
            try:
                ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{ckpt_path}: cannot read the learning checkpoint: {e}") from None
            if ck.get("task") != name or ck.get("settings") != {k: settings[k] for k in resume_keys}:
                raise CheckpointError(f"{ckpt_path} belongs to another run (task {ck.get('task')!r}, settings "
                                      f"{ck.get('settings')}); use another out_dir or delete it")
            with torch.no_grad():
                for dst, key in ((g_params, "g_live"), (list(g_ema), "g_ema"), (d_params, "d_live")):
                    for p, v in zip(dst, ck[key], strict=True):
                        p.copy_(v)
            opt_g.load_state_dict(ck["opt_g"])
            opt_d.load_state_dict(ck["opt_d"])
            sampler.load_state_dict(ck["sampler"])
            rng.set_state(ck["rng"])
            iteration, elapsed = int(ck["iteration"]), float(ck["elapsed"])

        fixed_z = torch.randn(min(64, 8 * 8), self.z_dim, generator=torch.Generator().manual_seed(seed + 12345))
        fixed_c = None if num_classes is None else torch.arange(fixed_z.shape[0]) % num_classes

        def with_ema(fn):
            saved = [p.detach().clone() for p in g_params]
            with torch.no_grad():
                for p, e in zip(g_params, g_ema):
                    p.copy_(e)
            try:
                return fn()
            finally:
                with torch.no_grad():
                    for p, s in zip(g_params, saved):
                        p.copy_(s)

        def write_samples():
            imgs = with_ema(lambda: self._run_g(fixed_z, task=name, class_ids=fixed_c))
            save_grid(imgs, out_dir / "samples" / f"it_{iteration:07d}.png", nrow=8, scale=2)

        def fake_classes(n):
            if num_classes is None:
                return None
            return torch.randint(num_classes, (n,), generator=rng)

        losses = {}
        t_start = time.time()
        bar = tqdm(total=iterations, initial=iteration, disable=not progress, dynamic_ncols=True,
                   desc=f"learn {name}", unit="it", leave=True)
        D_was, G_was = D.training, G.training
        stopped_early = False
        try:
            with gnn.use_task(G, name), self._d_head(name):
                while iteration < iterations:
                    t0 = time.time()
                    G.train(), D.train()
                    # generator step: non-saturating loss softplus(-D(G(z)))
                    for p in d_params:
                        p.requires_grad_(False)
                    z = torch.randn(bs, self.z_dim, generator=rng).to(dev)
                    c = fake_classes(bs)
                    with gnn.use_classes(G, c):
                        fake = G(z)
                    g_loss = F.softplus(-D(fake, c.to(dev) if c is not None else None)).mean()
                    opt_g.zero_grad(set_to_none=True)
                    g_loss.backward()
                    opt_g.step()
                    t = iteration
                    decay = min(settings["ema_decay"], (1 + t) / (10 + t)) if settings["ema_warmup"] else settings["ema_decay"]
                    update_ema(g_ema, g_live, decay)
                    # discriminator step: softplus(-D(x)) + gamma/2 * R1 on reals, softplus(D(G(z))) on fakes
                    for p in d_params:
                        p.requires_grad_(True)
                    for p in g_params:
                        p.requires_grad_(False)
                    idx = sampler.next_indices()
                    x_real = augment(batch(dataset, idx), rng).to(dev).requires_grad_(True)
                    c_real = None if class_labels is None else class_labels[idx].to(dev)
                    d_real = D(x_real, c_real)
                    r1 = r1_penalty(d_real, x_real)
                    loss_real = F.softplus(-d_real).mean() + 0.5 * gamma * r1
                    opt_d.zero_grad(set_to_none=True)
                    loss_real.backward()
                    z = torch.randn(bs, self.z_dim, generator=rng).to(dev)
                    c = fake_classes(bs)
                    with torch.no_grad(), gnn.use_classes(G, c):
                        x_fake = G(z)
                    loss_fake = F.softplus(D(x_fake, c.to(dev) if c is not None else None)).mean()
                    loss_fake.backward()
                    opt_d.step()
                    for p in g_params:
                        p.requires_grad_(True)
                    iteration += 1
                    elapsed += time.time() - t0
                    losses = {"g_loss": float(g_loss.detach()), "d_real": float(F.softplus(-d_real.detach()).mean()),
                              "d_fake": float(loss_fake.detach()), "r1": float(r1.detach())}
                    if not all(math.isfinite(v) for v in losses.values()):
                        raise FloatingPointError(f"learn {name!r}: non-finite loss at iteration {iteration}: {losses}")
                    bar.update(1)
                    if iteration % 5 == 0 or iteration == iterations:
                        bar.set_postfix(g=f"{losses['g_loss']:.3f}", d_real=f"{losses['d_real']:.3f}",
                                        d_fake=f"{losses['d_fake']:.3f}", r1=f"{losses['r1']:.2e}")
                    out_of_time = max_seconds is not None and time.time() - t_start > max_seconds
                    if out_dir is not None and (iteration % sample_every == 0 or iteration == iterations or out_of_time):
                        write_samples()
                    if ckpt_path is not None and (iteration % checkpoint_every == 0 or iteration == iterations
                                                  or out_of_time):
                        out_dir.mkdir(parents=True, exist_ok=True)
                        atomic_torch_save(state(), ckpt_path)
                    if callback is not None:
                        callback(iteration, losses)
                    if out_of_time and iteration < iterations:
                        stopped_early = True
                        bar.write(f"learn {name!r}: stopping at iteration {iteration} of {iterations}: "
                                  f"time limit of {max_seconds:.0f} s reached")
                        break
        finally:
            bar.close()
            G.train(G_was), D.train(D_was)
            for p in g_params + d_params:
                p.requires_grad_(True)
        # the style set kept for sampling is the EMA one
        with torch.no_grad():
            for p, e in zip(g_params, g_ema):
                p.copy_(e)
        return {"iterations_done": iteration, "train_seconds": round(elapsed, 2),
                "it_per_s": round(iteration / elapsed, 3) if elapsed > 0 else None,
                "stopped_early": stopped_early, "final_losses": losses}

    # ------------------------------------------------------------------ persistence
    def set_metric(self, task: str, key: str, value) -> None:
        """Record a metric (JSON-serialisable) for ``task``; saved in the manifest."""
        self._record(task)["metrics"][key] = value

    def save(self, directory) -> Path:
        """Write the memory to ``directory``: ``manifest.json`` + ``tasks/<stem>-<sha16>.safetensors``.

        The rules are :mod:`gmem.store`'s: task files are content addressed (deterministic bytes; a
        file already there is never rewritten), written atomically under unique temporary names, and
        the manifest is merged under the directory's lock with what other processes saved meanwhile:
        this save adds or updates this memory's tasks and removes only the tasks removed from this
        memory since it was loaded from (or saved to) ``directory``. A task another process stored
        under the same name with other contents raises :class:`gmem.store.TaskConflictError` and
        nothing is saved. A task of ``directory`` that was never used is not read (a damaged file
        stays as it is and the other tasks are saved); saving it to another directory copies its
        checked file. A memory on a custom base also stores the base once in ``base/``.
        """
        directory = store.prepare_directory(directory)
        same = self._directory is not None and self._directory.resolve() == directory.resolve()
        known = dict(getattr(self, "_on_disk", {})) if same else {}
        base_entry = {"kind": self.base_source.get("kind", "custom"), "sha256": self.base_hash,
                      "generator": self._G.config(), "discriminator": self._D.config()}
        if base_entry["kind"] == "default":
            base_entry["file_sha256"] = self.base_source.get("file_sha256")
        else:
            base_entry["path"] = "base"
        put, refresh = [], []
        for task in self._order:
            record = self.records[task]
            counts = {"style_parameters": self.parameter_counts(task)["total"]}
            if same and task in self._pending:  # untouched since it was read from here: never read it
                refresh.append({**record, **counts})
                continue
            if task in self._pending:
                data = store.read_task_bytes(self._directory, task, record)
            else:
                data = store.task_bytes(self._task_tensors(task), task)
            rel, digest = store.write_task_file(directory, task, data)
            entry = {k: v for k, v in record.items() if k not in ("file", "sha256")}
            entry.update({"file": rel, "sha256": digest, **counts})
            put.append(entry)
        write_base = None if base_entry["kind"] == "default" else (lambda: self._save_base(directory / "base"))
        manifest = store.commit(directory, base_entry, self.conversion, put, refresh=refresh,
                                removed=set(known) - set(self._order), known=known, before_write=write_base,
                                version=_version())
        for entry in put:
            self.records[entry["name"]].update({"file": entry["file"], "sha256": entry["sha256"]})
        for task in self._pending:
            self._pending[task] = store.entry_path(directory, self.records[task])
        stored = {e["name"]: e.get("sha256") for e in manifest["tasks"]}
        self._on_disk = {t: stored[t] for t in self._order if t in stored}
        self._directory = directory
        return directory

    def _save_base(self, base_dir: Path) -> None:
        from .models.base import base_config

        if (base_dir / "base.json").is_file():
            try:
                if base_config(base_dir).get("info", {}).get("state_sha256") == self.base_hash:
                    return  # saved once already
            except CheckpointError:
                pass
        G = Generator(**self._G.config())
        D = Discriminator(**self._D.config())
        G.load_state_dict(_base_state(self._G))
        with self._d_head("source"):
            D.load_state_dict(_base_state(self._D))
        save_base(G, D, base_dir, dtype=torch.float32, info={"state_sha256": self.base_hash})

    @staticmethod
    def _read_manifest(directory: Path) -> dict:
        """The manifest of ``directory``, validated (:func:`gmem.store.read_manifest`; errors name the field)."""
        return store.read_manifest(directory)

    @classmethod
    def load(cls, directory, *, lazy: bool = True) -> "GANMemory":
        """Open a memory written by :meth:`save`.

        The manifest is validated (errors name the field), the base description is checked within
        bounds before the base is built, and the base is checked against the manifest's hash. Task
        files are read when a task is first used (``lazy``), each confined to the memory directory
        and checked against its SHA-256; a missing or damaged file (or an entry without a hash)
        raises :class:`TaskFileError` naming it, for that task only. ``lazy=False`` reads every task
        now and warns (naming the file) about those that cannot be read, which stay unusable.
        """
        directory = Path(directory)
        manifest = cls._read_manifest(directory)
        base = manifest["base"]
        if base.get("kind") == "default":
            G, D = load_default_base()
            source = {"kind": "default", "file_sha256": base.get("file_sha256")}
        else:
            G, D = load_base(store.inside(directory, base.get("path", "base"), "base.path"))
            source = {"kind": "custom"}
        conv = manifest.get("conversion", {})
        mem = cls(G, D, g_include=conv.get("generator", G_MODULATED), d_include=conv.get("discriminator", D_MODULATED),
                  d_fc_per_task=conv.get("discriminator_fc_per_task", True), base_source=source)
        if mem.base_hash != base["sha256"]:
            raise CheckpointError(f"{directory / MANIFEST}: this memory was learned on a base with sha256 "
                                  f"{base['sha256'][:12]}..., but the base found ({base.get('kind')}) has "
                                  f"{mem.base_hash[:12]}...; its tasks would not fit")
        for entry in manifest["tasks"]:
            name = entry["name"]
            mem._order.append(name)
            mem.records[name] = dict(entry, metrics=dict(entry.get("metrics", {})))
            mem._pending[name] = store.entry_path(directory, entry)
        mem._directory = directory
        mem._on_disk = {e["name"]: e.get("sha256") for e in manifest["tasks"]}
        if not lazy:
            for name in mem.tasks:
                try:
                    mem._ensure_loaded(name)
                except TaskFileError as e:
                    warnings.warn(str(e), stacklevel=2)
        return mem

    def verify(self) -> dict[str, Optional[str]]:
        """Read every task not read yet; ``{task: None or the error message}``."""
        out = {}
        for name in self.tasks:
            try:
                self._ensure_loaded(name)
                out[name] = None
            except TaskFileError as e:
                out[name] = str(e)
        return out

    @property
    def loaded_tasks(self) -> list[str]:
        """Tasks whose weights are in memory (the others are read on first use)."""
        return [t for t in self._order if t not in self._pending]


def _version() -> str:
    from . import __version__

    return __version__
