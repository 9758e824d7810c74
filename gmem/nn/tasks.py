"""Model-level task management (peft-like): convert a model, add tasks, choose which one runs.

Every modulated layer of a model keeps the same ordered task list (``"source"`` first); the
functions here change all layers together and validate everything before changing anything, so a
bad call leaves the model as it was.
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
import warnings
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .layers import STYLE_GROUPS, ModulatedConv2d, ModulatedLayer, ModulatedLinear

__all__ = [
    "convert",
    "modulated_layers",
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


def _layers(model: nn.Module) -> list[tuple[str, ModulatedLayer]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = modulated_layers(model)
    if not layers:
        raise ValueError("model has no modulated layers: call gmem.nn.convert(model) first")
    names = layers[0][1].task_names
    for name, layer in layers[1:]:
        if layer.task_names != names:
            raise RuntimeError(
                f"modulated layers disagree on their tasks ({layers[0][0]!r}: {names}, {name!r}: "
                f"{layer.task_names}); add and remove tasks through gmem.nn functions only"
            )
    return layers


def convert(model: nn.Module, include: NameFilter = None, exclude: NameFilter = None) -> list[str]:
    """Replace ``nn.Conv2d``/``nn.Linear`` submodules in place by modulated layers with a frozen base.

    ``include``/``exclude``: glob patterns over qualified module names (a pattern also matches every
    module below a matching parent, e.g. ``"blocks.*"`` or ``"fc"``), a list of them, or a callable.
    Grouped convolutions cannot be modulated: they are left as they are, with a warning, unless
    ``include`` names them, which is an error. Returns the converted names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Conv2d, nn.Linear)):
        raise TypeError("convert replaces submodules in place: wrap a lone layer, or use ModulatedConv2d(layer)")
    existing = modulated_layers(model)
    if existing and existing[0][1].num_tasks > 1:
        raise ValueError(
            f"convert: the model already has tasks {existing[0][1].task_names}; convert every layer "
            "before adding tasks, so that all layers share the same tasks"
        )
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude", default=False)
    plan, skipped = [], []
    for name, module in model.named_modules():
        if not name or type(module) not in (nn.Conv2d, nn.Linear):
            continue
        if not inc(name) or exc(name):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            if include is not None:
                raise NotImplementedError(
                    f"convert: {name!r} is a grouped convolution (groups={module.groups}), which mAdaFM "
                    "cannot modulate"
                )
            skipped.append(name)
            continue
        plan.append((name, module))
    if include is not None and isinstance(include, (str, list, tuple)) and not plan:
        raise ValueError(f"convert: include={include!r} matched no nn.Conv2d/nn.Linear module")
    converted = []
    for name, module in plan:  # build all first: an error leaves the model untouched
        wrapper = ModulatedConv2d(module) if isinstance(module, nn.Conv2d) else ModulatedLinear(module)
        converted.append((name, wrapper))
    for name, wrapper in converted:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, wrapper)
    if skipped:
        warnings.warn(f"convert: left grouped convolutions unmodulated: {skipped}", stacklevel=2)
    return [name for name, _ in converted]


def list_tasks(model: nn.Module) -> list[str]:
    """Task names in index order; ``"source"`` (the frozen base) is task 0."""
    return list(_layers(model)[0][1].task_names)


def task_index(model: nn.Module, task: Task) -> int:
    """Index of ``task`` (a name, or an index that is checked)."""
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
    """Add a task to every modulated layer; returns its index.

    ``init``: the task whose style set the new one copies (``"source"``: gamma = std, beta = mean,
    bias = 0, i.e. the new task starts as the base). ``num_classes``: a conditional task gets one
    bias per class in its linear layers (choose classes with :func:`use_classes`).
    """
    layers = _layers(model)
    if not isinstance(name, str) or not name:
        raise TypeError(f"add_task: name must be a non-empty string, got {name!r}")
    if name in layers[0][1].task_names:
        raise ValueError(f"add_task: a task named {name!r} exists already")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"add_task: num_classes must be a positive int, got {num_classes!r}")
    init_index = task_index(model, init)
    for _, layer in layers:
        layer.add_style(name, init_index, num_classes if isinstance(layer, ModulatedLinear) else None)
    return layers[0][1].num_tasks - 1


def remove_task(model: nn.Module, task: Task) -> None:
    """Remove a task (never the source) from every layer; later tasks move down one index."""
    index = task_index(model, task)
    if index == 0:
        raise ValueError("remove_task: the source task is the frozen base and cannot be removed")
    for _, layer in _layers(model):
        layer.remove_style(index)


def set_task(model: nn.Module, task: Task) -> None:
    """Select one task for every modulated layer until changed (see :func:`use_task`)."""
    index = task_index(model, task)
    for _, layer in _layers(model):
        layer.active_task, layer.task_ids, layer.style_override = index, None, None


_STATE = ("active_task", "task_ids", "style_override", "class_ids")


@contextlib.contextmanager
def _selection(layers, **values) -> Iterator[None]:
    saved = [(layer, {k: getattr(layer, k) for k in _STATE}) for _, layer in layers]
    try:
        for _, layer in layers:
            for k, v in values.items():
                setattr(layer, k, v)
        yield
    finally:
        for layer, state in saved:
            for k, v in state.items():
                setattr(layer, k, v)


def use_task(model: nn.Module, task: Task):
    """Context manager: every modulated layer runs ``task`` (a name or index) inside the block."""
    index = task_index(model, task)
    return _selection(_layers(model), active_task=index, task_ids=None, style_override=None)


def _as_task_ids(model: nn.Module, task_ids) -> Tensor:
    names = list_tasks(model)
    if isinstance(task_ids, Tensor):
        if task_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"use_tasks: task_ids must be an integer (long) tensor, got {task_ids.dtype}")
        if task_ids.ndim != 1:
            raise ValueError(f"use_tasks: task_ids must be one task per sample, shape [N], got {tuple(task_ids.shape)}")
        ids = task_ids.long()
    elif isinstance(task_ids, (list, tuple)):
        ids = torch.tensor([task_index(model, t) for t in task_ids], dtype=torch.long)
    else:
        raise TypeError(f"use_tasks: task_ids must be a LongTensor [N] or a list of task names/indices, got {type(task_ids).__name__}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
        raise IndexError(f"use_tasks: task ids must lie in [0, {len(names)}) for tasks {names}, got {ids.tolist()}")
    return ids


def use_tasks(model: nn.Module, task_ids):
    """Context manager: a mixed-task batch, sample ``n`` running task ``task_ids[n]``.

    ``task_ids``: LongTensor ``[N]`` of task indices, or a list of names/indices. The tensor is
    moved to each layer's device.
    """
    layers = _layers(model)
    ids = _as_task_ids(model, task_ids)
    device = layers[0][1].weight.device
    return _selection(layers, task_ids=ids.to(device), style_override=None)


def use_classes(model: nn.Module, class_ids: Optional[Tensor]):
    """Context manager: the class of each sample (``LongTensor [N]``) for conditional tasks."""
    layers = _layers(model)
    if class_ids is not None:
        if not isinstance(class_ids, Tensor) or class_ids.dtype.is_floating_point or class_ids.ndim != 1:
            raise TypeError("use_classes: class_ids must be an integer tensor [N]")
        class_ids = class_ids.long().to(layers[0][1].weight.device)
    saved = [(layer, layer.class_ids) for _, layer in layers]

    @contextlib.contextmanager
    def scope():
        try:
            for _, layer in layers:
                layer.class_ids = class_ids
            yield
        finally:
            for layer, value in saved:
                layer.class_ids = value

    return scope()


def set_backend(model: nn.Module, backend: str) -> None:
    """Which gmem.ops backend every modulated layer calls (``"auto"`` by default)."""
    from ..ops.backends import get_backend

    if backend != "auto":
        get_backend(backend)  # unknown names fail here, not at the next forward
    for _, layer in _layers(model):
        layer.backend = backend


def style_parameters(model: nn.Module, task: Task) -> list[nn.Parameter]:
    """The trainable parameters of ``task`` (gamma, beta, bias of every modulated layer)."""
    index = task_index(model, task)
    if index == 0:
        raise ValueError("style_parameters: the source task is the frozen base and has no trainable parameters")
    return [p for _, layer in _layers(model) for p in layer.styles[index - 1].parameters()]


def count_style_parameters(model: nn.Module, task: Task = 1) -> int:
    """Number of style values one task adds (its gamma, beta and bias in every layer)."""
    return sum(p.numel() for p in style_parameters(model, task))


def style_state_dict(model: nn.Module, task: Task) -> dict[str, Tensor]:
    """``{"<layer>.gamma": ..., "<layer>.beta": ..., "<layer>.bias": ...}`` of one task (copies)."""
    index = task_index(model, task)
    state = {}
    for name, layer in _layers(model):
        for group, value in zip(STYLE_GROUPS, layer.style(index)):
            state[f"{name}.{group}"] = value.detach().clone()
    return state


def load_style_state_dict(model: nn.Module, task: Task, state: dict[str, Tensor]) -> None:
    """Copy a :func:`style_state_dict` into ``task``; checks every key and shape before writing."""
    index = task_index(model, task)
    if index == 0:
        raise ValueError("load_style_state_dict: the source task is the frozen base and cannot be loaded into")
    layers = _layers(model)
    expected = {f"{name}.{g}": (layer, g) for name, layer in layers for g in STYLE_GROUPS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"load_style_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, (layer, group) in expected.items():
        target = getattr(layer.styles[index - 1], group)
        value = state[key]
        if not isinstance(value, Tensor) or value.shape != target.shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"load_style_state_dict: {key} must have shape {tuple(target.shape)}, got {got}")
    with torch.no_grad():
        for key, (layer, group) in expected.items():
            getattr(layer.styles[index - 1], group).copy_(state[key])


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
    callable) chooses which layers mix; the others run task_a. ``lam = 0`` is task_a, ``lam = 1``
    with all groups and layers is task_b (the paper's Figures 2 and 3).
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
    all_layers = _layers(model)
    saved = [(layer, {k: getattr(layer, k) for k in _STATE}) for _, layer in all_layers]
    try:
        for name, layer in all_layers:
            sa, sb = layer.style(a), layer.style(b)
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
            layer.style_override, layer.task_ids = tuple(mixed), None
        yield
    finally:
        for layer, state in saved:
            for k, v in state.items():
                setattr(layer, k, v)
