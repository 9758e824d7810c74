"""Model-level task management (peft-like): add tasks, choose which one runs, read and write them.

Every task-aware module of a model (modulated layers, per-task copies) keeps the same ordered task
list (``"source"`` first); the functions here change all of them together and validate everything
before changing anything, so a bad call leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .bank import TaskBank, select
from .layers import STYLE_GROUPS, ModulatedLayer, ModulatedLinear
from .per_task import PerTaskModule

__all__ = [
    "modulated_layers",
    "per_task_modules",
    "trainable_parameters",
    "list_tasks",
    "task_index",
    "add_task",
    "remove_task",
    "use_task",
    "use_tasks",
    "use_classes",
    "set_task",
    "set_backend",
    "style_parameters",
    "style_state_dict",
    "load_style_state_dict",
    "interpolate",
    "count_style_parameters",
]

Task = Union[str, int]
NameFilter = Union[None, str, Sequence[str], Callable[[str], bool]]

# group aliases accepted by interpolate(): the paper speaks of scales, shifts and biases
_GROUP_ALIASES = {"gamma": "gamma", "scale": "gamma", "scales": "gamma",
                  "beta": "beta", "shift": "beta", "shifts": "beta",
                  "bias": "bias", "biases": "bias"}


def _matcher(spec: NameFilter, what: str, default: bool = True) -> Callable[[str], bool]:
    """Module-name filter: a glob pattern, a list of globs (a name or any of its parents), or a callable."""
    if spec is None:
        return lambda name: default
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be a glob string, a list of them, or a callable, got {spec!r}")

    def match(name: str) -> bool:
        parts = name.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(p_name, pat) for pat in patterns for p_name in prefixes)

    return match


def modulated_layers(model: nn.Module) -> list[tuple[str, ModulatedLayer]]:
    """``[(qualified name, layer)]`` of every modulated layer in ``model`` (the model itself included)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModulatedLayer)]


def per_task_modules(model: nn.Module) -> list[tuple[str, PerTaskModule]]:
    """``[(qualified name, module)]`` of every per-task module (copied norms, ``per_task`` globs)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PerTaskModule)]


def _banks(model: nn.Module) -> list[tuple[str, TaskBank]]:
    """Every task-aware module of ``model``; checks that they agree on the task list."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    banks = [(name, m) for name, m in model.named_modules() if isinstance(m, TaskBank)]
    if not any(isinstance(m, ModulatedLayer) for _, m in banks):
        raise ValueError("model has no modulated layers: call gmem.nn.convert(model) first")
    names = banks[0][1].task_names
    for name, bank in banks[1:]:
        if bank.task_names != names:
            raise RuntimeError(
                f"task-aware modules disagree on their tasks ({banks[0][0]!r}: {names}, {name!r}: "
                f"{bank.task_names}); add and remove tasks through gmem.nn functions only"
            )
    return banks


def _layers(model: nn.Module) -> list[tuple[str, ModulatedLayer]]:
    return [(n, m) for n, m in _banks(model) if isinstance(m, ModulatedLayer)]


def list_tasks(model: nn.Module) -> list[str]:
    """Task names in index order; ``"source"`` (the frozen base) is task 0."""
    return list(_banks(model)[0][1].task_names)


def task_index(model: nn.Module, task: Task) -> int:
    """Index of ``task`` (a name, or an index that is checked): its position in :func:`list_tasks`."""
    names = list_tasks(model)
    if isinstance(task, bool) or not isinstance(task, (str, int)):
        raise TypeError(f"task must be a task name or index, got {type(task).__name__}")
    if isinstance(task, int):
        if not 0 <= task < len(names):
            raise IndexError(f"task index {task} out of range: the model has {len(names)} tasks {names}")
        return task
    if task not in names:
        raise KeyError(f"unknown task {task!r}; the model has tasks {names}")
    return names.index(task)


def add_task(model: nn.Module, name: str, init: Task = "source", num_classes: Optional[int] = None) -> int:
    """Add a task to every task-aware module; returns its index.

    ``init``: the task whose style sets and per-task modules the new one copies (``"source"``:
    gamma = std, beta = mean, bias = 0 and the original norms, i.e. the new task starts as the
    base). ``num_classes``: a conditional task gets one bias per class in its linear layers (choose
    classes with :func:`use_classes`).
    """
    banks = _banks(model)
    if not isinstance(name, str) or not name:
        raise TypeError(f"add_task: name must be a non-empty string, got {name!r}")
    if name in banks[0][1].task_names:
        raise ValueError(f"add_task: a task named {name!r} exists already")
    bad_classes = isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    if num_classes is not None and bad_classes:
        raise ValueError(f"add_task: num_classes must be a positive int, got {num_classes!r}")
    init_index = task_index(model, init)
    # build every entry first: an error leaves the model as it was
    entries = [
        bank.make_entry(name, init_index, num_classes=num_classes if isinstance(bank, ModulatedLinear) else None)
        for _, bank in banks
    ]
    for (_, bank), entry in zip(banks, entries):
        bank.add_entry(name, entry)
    return banks[0][1].num_tasks - 1


def remove_task(model: nn.Module, task: Task) -> None:
    """Remove a task (never the source) everywhere; later tasks move down one index."""
    index = task_index(model, task)
    if index == 0:
        raise ValueError("remove_task: the source task is the frozen base and cannot be removed")
    for _, bank in _banks(model):
        bank.remove_entry(index)


def set_task(model: nn.Module, task: Task) -> None:
    """Make ``task`` the default of every task-aware module (what runs outside any ``with`` block).

    Unlike :func:`use_task` this changes the modules themselves, for every thread; serve
    concurrent callers with :func:`use_task` instead.
    """
    index = task_index(model, task)
    for _, bank in _banks(model):
        bank.active_task, bank.task_ids, bank.style_override = index, None, None


def use_task(model: nn.Module, task: Task):
    """Context manager: the model runs ``task`` (a name or index) inside the block.

    The choice is per call context (thread, asyncio task), never stored on the model: concurrent
    callers may select different tasks on one model.
    """
    index = task_index(model, task)
    return select({bank: dict(task=index, task_ids=None, override=None) for _, bank in _banks(model)})


def _as_task_ids(model: nn.Module, task_ids) -> Tensor:
    names = list_tasks(model)
    if isinstance(task_ids, Tensor):
        if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
            raise TypeError(f"use_tasks: task_ids must be an integer (long) tensor, got {task_ids.dtype}")
        if task_ids.ndim != 1:
            raise ValueError(f"use_tasks: task_ids must be one task per sample, shape [N], got {tuple(task_ids.shape)}")
        ids = task_ids.long()
    elif isinstance(task_ids, (list, tuple)):
        ids = torch.tensor([task_index(model, t) for t in task_ids], dtype=torch.long)
    else:
        raise TypeError("use_tasks: task_ids must be a LongTensor [N] or a list of task names/indices, "
                        f"got {type(task_ids).__name__}")
    if ids.numel() and ops.values_known(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
        raise IndexError(f"use_tasks: task ids must lie in [0, {len(names)}) for tasks {names}, got {ids.tolist()}")
    return ids


def _device(banks) -> torch.device:
    for _, bank in banks:
        for t in bank.parameters():
            return t.device
    return torch.device("cpu")


def use_tasks(model: nn.Module, task_ids):
    """Context manager: a mixed-task batch, sample ``n`` running task ``task_ids[n]``.

    ``task_ids``: LongTensor ``[N]`` of task indices, or a list of names/indices (checked here,
    eagerly). The tensor is moved to the model's device.
    """
    banks = _banks(model)
    ids = _as_task_ids(model, task_ids).to(_device(banks))
    return select({bank: dict(task_ids=ids, override=None) for _, bank in banks})


def use_classes(model: nn.Module, class_ids: Optional[Tensor]):
    """Context manager: the class of each sample (``LongTensor [N]``) for conditional tasks."""
    banks = _banks(model)
    if class_ids is not None:
        if not isinstance(class_ids, Tensor) or class_ids.dtype.is_floating_point or class_ids.ndim != 1:
            raise TypeError("use_classes: class_ids must be an integer tensor [N]")
        class_ids = class_ids.long().to(_device(banks))
    return select({bank: dict(class_ids=class_ids) for _, bank in banks})


def set_backend(model: nn.Module, backend: str) -> None:
    """Which gmem.ops backend every modulated layer calls (``"auto"`` by default)."""
    from ..ops.backends import get_backend

    if backend != "auto":
        get_backend(backend)  # unknown names fail here, not at the next forward
    for _, layer in _layers(model):
        layer.backend = backend


def style_parameters(model: nn.Module, task: Task) -> list[nn.Parameter]:
    """The style parameters of ``task`` (gamma, beta, bias of every modulated layer)."""
    index = task_index(model, task)
    if index == 0:
        raise ValueError("style_parameters: the source task is the frozen base and has no trainable parameters")
    return [p for _, layer in _layers(model) for p in layer.entry(index).parameters()]


def trainable_parameters(model: nn.Module, task: Task) -> list[nn.Parameter]:
    """Everything training ``task`` may change: its style parameters and the parameters of its
    per-task modules (normalisation copies, ``per_task`` globs).

    Training only these, with ``task`` selected (train mode included: per-task BatchNorm updates the
    task's own running statistics), leaves the source and every other task bit for bit as they were.
    """
    index = task_index(model, task)
    if index == 0:
        raise ValueError("trainable_parameters: the source task is the frozen base and has no trainable parameters")
    params = style_parameters(model, index)
    params += [p for _, m in per_task_modules(model) for p in m.entry(index).parameters()]
    return params


def count_style_parameters(model: nn.Module, task: Task = 1) -> int:
    """Number of style values one task adds (its gamma, beta and bias in every layer)."""
    return sum(p.numel() for p in style_parameters(model, task))


def _per_task_state(model: nn.Module, index: int) -> dict[str, tuple[nn.Module, str]]:
    """``{"<module>.<tensor>": (module of task index, tensor name)}`` of the per-task modules."""
    out = {}
    for name, m in per_task_modules(model):
        target = m.module(index)
        for key in target.state_dict():
            out[f"{name}.{key}"] = (target, key)
    return out


def style_state_dict(model: nn.Module, task: Task) -> dict[str, Tensor]:
    """One task's state (copies): ``"<layer>.gamma|beta|bias"`` of every modulated layer, plus
    ``"<module>.<name>"`` of every per-task module (e.g. ``"bn1.running_mean"``). A compressed conv
    (:mod:`gmem.nn.lowrank`) gives ``"<layer>.bias"`` and ``"<layer>.lowrank.<gamma|beta>.<lam|u|s|v>"``."""
    index = task_index(model, task)
    state = {}
    for name, layer in _layers(model):
        for key, value in layer.entry_state(index).items():
            state[f"{name}.{key}"] = value
    for key, (module, sub) in _per_task_state(model, index).items():
        state[key] = module.state_dict()[sub].detach().clone()
    return state


def load_style_state_dict(model: nn.Module, task: Task, state: dict[str, Tensor]) -> None:
    """Copy a :func:`style_state_dict` into ``task``; checks every key and shape before writing.

    A compressed conv's factors (``.lowrank.`` keys) are not loaded here: they belong to the layer's
    knowledge bases (:mod:`gmem.compress.knowledge` installs them first); only its bias is.
    """
    index = task_index(model, task)
    if index == 0:
        raise ValueError("load_style_state_dict: the source task is the frozen base and cannot be loaded into")
    targets = {}
    for name, layer in _layers(model):
        for g, target in layer.entry_targets(index).items():
            targets[f"{name}.{g}"] = target
    for key, (module, sub) in _per_task_state(model, index).items():
        targets[key] = module.state_dict(keep_vars=True)[sub]
    if not isinstance(state, dict):
        raise TypeError(f"load_style_state_dict: state must be a dict of tensors, got {type(state).__name__}")
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise KeyError(f"load_style_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, target in targets.items():
        value = state[key]
        if not isinstance(value, Tensor) or value.shape != target.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"load_style_state_dict: {key} must have shape {tuple(target.shape)}, got {got}")
        if value.dtype.is_floating_point != target.dtype.is_floating_point:
            raise TypeError(f"load_style_state_dict: {key} has dtype {value.dtype}, expected {target.dtype}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])


@contextlib.contextmanager
def interpolate(
    model: nn.Module,
    task_a: Task,
    task_b: Task,
    lam: float,
    groups: Iterable[str] = STYLE_GROUPS,
    layers: NameFilter = None,
) -> Iterator[None]:
    """Context manager: run the style set ``(1 - lam) * theta_a + lam * theta_b``.

    ``groups`` chooses which parameter groups mix (``"gamma"``/``"scale"``, ``"beta"``/``"shift"``,
    ``"bias"``); the others stay at task_a's values. ``layers`` (globs over layer names, or a
    callable) chooses which layers mix; the others run task_a. Per-task modules (normalisation
    copies) in the chosen layers mix all their floating-point tensors. ``lam = 0`` is task_a,
    ``lam = 1`` with all groups and layers is task_b (the paper's Figures 2 and 3).
    """
    a, b = task_index(model, task_a), task_index(model, task_b)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"interpolate: lam must be a number, got {type(lam).__name__}")
    chosen = set()
    for g in ([groups] if isinstance(groups, str) else groups):
        if g not in _GROUP_ALIASES:
            raise ValueError(f"interpolate: unknown parameter group {g!r}; use gamma/scale, beta/shift, bias")
        chosen.add(_GROUP_ALIASES[g])
    match = _matcher(layers, "layers")
    changes = {}
    for name, bank in _banks(model):
        if isinstance(bank, PerTaskModule):
            ma, mb = bank.module(a), bank.module(b)
            if match(name):
                values = {}
                sb = mb.state_dict()
                for key, va in ma.state_dict().items():
                    vb = sb[key]
                    values[key] = torch.lerp(va, vb, float(lam)) if va.is_floating_point() else va
                changes[bank] = dict(task_ids=None, override=(a, values))
            else:
                changes[bank] = dict(task=a, task_ids=None, override=None)
            continue
        sa, sb = bank.dense_style(a), bank.dense_style(b)  # compressed tasks mix densified
        mixed = []
        for group, va, vb in zip(STYLE_GROUPS, sa, sb):
            if group in chosen and match(name):
                if va.shape != vb.shape:
                    raise ValueError(
                        f"interpolate: {name}.{group} has shapes {tuple(va.shape)} and {tuple(vb.shape)} "
                        "(a conditional and an unconditional task?)"
                    )
                mixed.append(torch.lerp(va.detach(), vb.detach(), float(lam)))
            else:
                mixed.append(va.detach())
        changes[bank] = dict(task=a, task_ids=None, override=tuple(mixed))
    with select(changes):
        yield
