"""Converting a model in place, and getting plain PyTorch models back (export one task, unload).

``convert`` replaces the layers of :data:`gmem.nn.kinds.MODULATED_LAYERS` (``nn.Linear``, every
``nn.Conv*d``/``nn.ConvTranspose*d``, grouped too) by modulated layers, wraps normalisation layers
(and modules named by ``per_task``) in :class:`PerTaskModule`, and freezes every parameter of the
base: afterwards only what :func:`gmem.nn.add_task` creates is trainable.

Rules for what is converted:

* exact types only. A subclass may compute something else in its forward (weight
  standardisation, quantisation, ...), which a modulated layer would silently drop: it is
  skipped and reported.
* modules whose parent reads their weights directly instead of calling them are skipped:
  ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj.weight``) and
  ``nn.TransformerEncoderLayer`` (its fused fast path reads ``linear1``, ``linear2``, ``norm1``,
  ``norm2``). A modulated layer there would run the source for every task.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from .kinds import MODULATED_LAYERS
from .layers import ModulatedLayer
from .per_task import NORM_TYPES, PerTaskModule
from .tasks import NameFilter, Task, _banks, _matcher, task_index

__all__ = ["Converted", "convert", "export", "unload"]

# A converted model's parameters' requires_grad flags before convert() froze them (unload() restores
# them), kept here rather than as an attribute on the caller's model.
_REQUIRES_GRAD: "weakref.WeakKeyDictionary[nn.Module, dict[str, bool]]" = weakref.WeakKeyDictionary()

# parents whose forward reads these children's weights directly (None: every child)
_DIRECT_READERS: dict[type, Optional[tuple[str, ...]]] = {
    nn.MultiheadAttention: None,
    nn.TransformerEncoderLayer: ("linear1", "linear2", "norm1", "norm2"),
}


class Converted(list):
    """The names :func:`convert` modulated (a list), with ``skipped = [(name, reason)]`` for the
    layers of the modulated kinds (and subclasses) it left as they were, and ``per_task``:
    the modules copied per task."""

    def __init__(self, names, skipped, per_task):
        super().__init__(names)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.per_task: list[str] = list(per_task)


def _read_directly(model: nn.Module) -> dict[str, str]:
    """``{child name: reason}`` for modules whose parent reads their parameters directly."""
    out = {}
    for name, module in model.named_modules():
        for kind, children in _DIRECT_READERS.items():
            if type(module) is kind or isinstance(module, kind):
                for child, _ in module.named_modules():
                    if child and (children is None or child.split(".")[0] in children):
                        out[f"{name}.{child}" if name else child] = (
                            f"{kind.__name__} reads this module's weights directly in its forward"
                        )
    return out


def convert(
    model: nn.Module,
    include: NameFilter = None,
    exclude: NameFilter = None,
    per_task: NameFilter = None,
    shared: NameFilter = None,
) -> Converted:
    """Convert ``model`` in place: modulated linear and convolution layers, per-task norms, frozen base.

    ``include``/``exclude``: which conv/linear layers to modulate; glob patterns over qualified
    module names (a pattern also matches every module below a matching parent, e.g. ``"blocks.*"``
    or ``"fc"``), a list of them, or a callable. ``per_task``: globs of further modules to copy per
    task (e.g. a classifier head; nothing below them is modulated). Normalisation layers that hold
    parameters or running statistics (BatchNorm*, SyncBatchNorm, GroupNorm, LayerNorm,
    InstanceNorm*) are copied per task unless ``shared`` names them. Every parameter of the model
    is frozen (``requires_grad=False``). Returns the modulated names as a :class:`Converted` list
    (``.skipped``, ``.per_task``); a grouped convolution named by ``include`` is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, tuple(MODULATED_LAYERS)):
        raise TypeError("convert replaces submodules in place: wrap a lone layer, or use ModulatedConv2d(layer)")
    existing = [m for _, m in model.named_modules() if isinstance(m, (ModulatedLayer, PerTaskModule))]
    if existing and existing[0].num_tasks > 1:
        raise ValueError(
            f"convert: the model already has tasks {existing[0].task_names}; convert every layer "
            "before adding tasks, so that all layers share the same tasks"
        )
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude", default=False)
    keep, shared_match = _matcher(per_task, "per_task", default=False), _matcher(shared, "shared", default=False)
    direct = _read_directly(model)
    plan, copies, skipped, inside = [], [], [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, (ModulatedLayer, PerTaskModule)) or any(
            name.startswith(p + ".") for p in inside
        ):
            if name and isinstance(module, (ModulatedLayer, PerTaskModule)):
                inside.append(name)
            continue
        if per_task is not None and keep(name):
            if name in direct:
                raise ValueError(f"convert: per_task names {name!r}, but {direct[name]}")
            copies.append((name, module))
            inside.append(name)
            continue
        if isinstance(module, NORM_TYPES) and not shared_match(name):
            stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
            if stateful and name in direct:
                skipped.append((name, direct[name] + ": kept shared"))
            elif stateful:
                copies.append((name, module))
                inside.append(name)
            continue
        if not isinstance(module, tuple(MODULATED_LAYERS)) or not inc(name) or exc(name):
            continue
        reason = direct.get(name)
        if reason is None and type(module) not in MODULATED_LAYERS:
            parent_type = next(t for t in MODULATED_LAYERS if isinstance(module, t)).__name__
            reason = (f"{type(module).__name__} subclasses nn.{parent_type}"
                      " and may compute something else: only exact types are converted")
        if reason is not None:
            skipped.append((name, reason))
            continue
        plan.append((name, module))
    if include is not None and isinstance(include, (str, list, tuple)) and not plan:
        raise ValueError(f"convert: include={include!r} matched no layer of a modulated kind "
                         f"({', '.join(t.__name__ for t in MODULATED_LAYERS)})")
    # build everything first: an error leaves the model untouched
    built = [(name, MODULATED_LAYERS[type(m)](m)) for name, m in plan]
    built += [(name, PerTaskModule(m)) for name, m in copies]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, wrapper in built:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, wrapper)
    for p in model.parameters():
        p.requires_grad_(False)
    _REQUIRES_GRAD.setdefault(model, flags)  # what unload() restores (the flags before the first convert)
    if skipped:
        warnings.warn(f"convert: left unmodulated: {[f'{n} ({r})' for n, r in skipped]}", stacklevel=2)
    return Converted([n for n, _ in plan], skipped, [n for n, _ in copies])


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
    return model


def _plain(model: nn.Module, index: int) -> nn.Module:
    """A deep copy of ``model`` with every task-aware module replaced by the plain one of ``index``."""
    banks = _banks(model)
    replacements = []
    with torch.no_grad():
        for name, bank in banks:
            if isinstance(bank, PerTaskModule):
                replacements.append((name, copy.deepcopy(bank.module(index))))
                continue
            if index == 0:
                weight = bank.weight.detach().clone()
                bias = None if bank.bias is None else bank.bias.detach().clone()
            else:
                gamma, beta, delta = bank.dense_style(index)
                if delta.ndim != 1:
                    raise ValueError(
                        f"export: task {bank.task_names[index]!r} is conditional (one bias per class in "
                        f"{name!r}): a plain nn.Linear has one bias; export is for unconditional tasks"
                    )
                weight = bank.modulated_weight(gamma.detach(), beta.detach())
                bias = bank.total_bias(delta.detach()).clone()
            replacements.append((name, bank.plain_module(weight.contiguous(), bias)))
    # copy the rest of the model without duplicating the banks: they are replaced below
    memo = {id(bank): None for _, bank in banks}
    out = copy.deepcopy(model, memo)
    for name, module in replacements:
        out = _replace(out, name, module)
    return out


def export(model: nn.Module, task: Task) -> nn.Module:
    """A plain PyTorch copy of ``model`` computing ``task``: every modulated layer becomes an
    plain ``torch.nn`` layer with the task's weight ``gamma * weight_norm + beta`` (float32
    rounding of the modulated op) and bias ``b + bias``, every per-task module the task's copy.
    Nothing of gmem remains inside; ``model`` is not changed. Parameters are trainable."""
    out = _plain(model, task_index(model, task))
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def unload(model: nn.Module) -> nn.Module:
    """The unconverted model (a copy; ``model`` is not changed): original weights, norms and
    ``requires_grad`` flags, the same state dict and outputs as before :func:`convert`."""
    out = _plain(model, 0)
    flags = _REQUIRES_GRAD.get(model, {})
    for name, p in out.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))
    return out
