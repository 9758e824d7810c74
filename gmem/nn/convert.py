"""Converting a model in place: modulated layers, per-task copies of shared modules, a frozen base.

``convert`` replaces the layer kinds of :data:`gmem.nn.kinds.MODULATED_LAYERS` (``nn.Linear``, every
``nn.Conv*d``/``nn.ConvTranspose*d``, grouped too) by modulated layers, wraps
normalisation layers (and modules named by ``per_task``) in :class:`PerTaskModule`, and freezes every
parameter of the base: afterwards only what :func:`gmem.nn.add_task` creates is trainable. Plain
models come back with :func:`gmem.nn.export` and :func:`gmem.nn.unload` (:mod:`gmem.nn.export`).

Rules:

* Nothing with weights is left behind silently: every module holding parameters of its own that is
  neither modulated nor copied per task is listed in ``Converted.skipped`` with the reason, and
  ``strict=True`` raises instead (except for what the caller chose to leave out with ``include``,
  ``exclude`` or ``shared``).
* Exact kinds only. A subclass may compute something else in its forward (weight standardisation,
  quantisation, ...), which a modulated layer would silently drop: it is skipped.
* Modules whose parent reads their weights directly instead of calling them are skipped:
  ``nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj.weight``) and the fused inference path
  of ``nn.TransformerEncoderLayer`` (``linear1``, ``linear2``, ``norm1``, ``norm2``). A modulated layer
  there would run the source for every task.
* A module reached under several names is converted once and the one modulated module takes its
  place under every name. A modulated layer keeps the very parameter objects of the layer it
  replaces, so parameters tied to other modules (``head.weight = emb.weight``) stay tied in the
  converted model and in :func:`gmem.nn.unload`.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

from torch import nn

from .kinds import MODULATED_LAYERS
from .layers import ModulatedLayer
from .per_task import NORM_TYPES, PerTaskModule
from .tasks import NameFilter, _matcher

__all__ = ["Converted", "convert", "module_names", "original_requires_grad"]


# A converted model's parameters' requires_grad flags before convert() froze them (unload() restores
# them), kept here rather than as an attribute on the caller's model.
_REQUIRES_GRAD: "weakref.WeakKeyDictionary[nn.Module, dict[str, bool]]" = weakref.WeakKeyDictionary()

# parents whose forward reads these children's weights directly (None: every child)
_DIRECT_READERS: dict[type, Optional[tuple[str, ...]]] = {
    nn.MultiheadAttention: None,
    nn.TransformerEncoderLayer: ("linear1", "linear2", "norm1", "norm2"),
}

_ATTENTION_REASON = (
    "nn.MultiheadAttention passes in_proj_weight and out_proj.weight to its attention function (one weight "
    "per call) instead of calling modules: its projections stay frozen and shared by every task "
    "(exclude=[name] acknowledges this)"
)


def original_requires_grad(model: nn.Module) -> dict[str, bool]:
    """``{parameter name: requires_grad}`` of ``model`` before its first :func:`convert` froze it."""
    return dict(_REQUIRES_GRAD.get(model, {}))


class Converted(list):
    """The names :func:`convert` modulated (a list), with

    * ``skipped = [(name, reason)]``: every module with parameters of its own that stays frozen and
      shared by every task (modules inside a modulated or per-task module excepted);
    * ``chosen``: the names in ``skipped`` the caller left out on purpose (``include``/``exclude``/
      ``shared``); ``strict=True`` raises for the others;
    * ``per_task``: the modules copied per task.
    """

    def __init__(self, names, skipped, per_task, chosen=()):
        super().__init__(names)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.per_task: list[str] = list(per_task)
        self.chosen: list[str] = list(chosen)


def _own_parameters(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False)]


def _direct_readers(model: nn.Module) -> dict[str, str]:
    """``{module name: reason}`` for modules whose parent reads their parameters directly."""
    out = {}
    for name, module in model.named_modules():
        for kind, children in _DIRECT_READERS.items():
            if not isinstance(module, kind):
                continue
            if kind is nn.MultiheadAttention:
                out[name] = _ATTENTION_REASON
            for child, _ in module.named_modules():
                if child and (children is None or child.split(".")[0] in children):
                    out[f"{name}.{child}" if name else child] = (
                        f"{kind.__name__} reads this module's weights directly instead of calling it: it "
                        "stays frozen and shared by every task (exclude=[name] acknowledges this)"
                    )
    return out


def _unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why a weight-bearing module of no modulated kind is left alone (None: it holds no parameters)."""
    for kind in MODULATED_LAYERS:
        if isinstance(module, kind):
            return (f"{type(module).__name__} subclasses nn.{kind.__name__} and may compute something else: only "
                    "exact types are converted; it stays frozen and shared (per_task=[name] copies it per "
                    "task, exclude=[name] acknowledges this)")
    own = _own_parameters(module)
    if not own:
        return None
    kinds = ", ".join(f"nn.{k.__name__}" for k in MODULATED_LAYERS)
    return (f"{type(module).__name__} (parameters {own}) is not a kind gmem modulates ({kinds}): it stays "
            "frozen and shared by every task; per_task=[name] gives each task its own copy, "
            "exclude=[name] acknowledges this")


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(submodule): every name it is reachable under}`` (a reused module has several)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            out.setdefault(id(module), []).append(name)
    return out


def _build(kind: type[ModulatedLayer], module: nn.Module) -> ModulatedLayer:
    """The modulated layer of ``module``, holding ``module``'s own parameter objects (ties survive)."""
    layer = kind(module)
    for pname, p in module.named_parameters(recurse=False):
        mine = getattr(layer, pname, None)
        if isinstance(mine, nn.Parameter) and mine.shape == p.shape and mine.dtype == p.dtype:
            setattr(layer, pname, p)
    return layer


def _note_ties(model: nn.Module, skipped: list, plan: list) -> list[tuple[str, str]]:
    """``skipped`` with a note on each parameter tied to a layer that gets modulated (GPT's
    ``head.weight = emb.weight``): under a task that layer reads the task's weight, the other module
    the source's."""
    modulated = {id(p): f"{name}.{pname}" for name, module, _ in plan for pname, p in module.named_parameters(
        recurse=False)}
    out = []
    for name, reason in skipped:
        module = model.get_submodule(name)
        ties = [(pname, modulated[id(p)]) for pname, p in module.named_parameters(recurse=False) if id(p) in modulated]
        for pname, other in ties:
            reason += (f"; its {pname} is tied to {other}, which is modulated: under a task that layer reads the "
                       "task's weight and this module the source's (exclude the modulated layer to keep them equal)")
        out.append((name, reason))
    return out


def convert(
    model: nn.Module,
    include: NameFilter = None,
    exclude: NameFilter = None,
    per_task: NameFilter = None,
    shared: NameFilter = None,
    strict: bool = False,
) -> Converted:
    """Convert ``model`` in place: modulated layers, per-task norms, frozen base.

    ``include``/``exclude``: which layers to modulate; glob patterns over qualified module names (a
    pattern also matches every module below a matching parent, e.g. ``"blocks.*"`` or ``"fc"``), a
    list of them, or a callable. ``per_task``: globs of further modules to copy per task (e.g. a
    classifier head; nothing below them is modulated). Normalisation layers that hold parameters or
    running statistics (BatchNorm*, SyncBatchNorm, GroupNorm, LayerNorm, InstanceNorm*, RMSNorm) are
    copied per task unless ``shared`` names them. Every parameter of the model is frozen
    (``requires_grad=False``).

    Returns the modulated names as a :class:`Converted` list (``.skipped``, ``.chosen``,
    ``.per_task``). A module reached under several names is listed once, under its first name.
    ``strict=True``: raise a ValueError naming every skipped module the caller did not leave out on
    purpose, before changing anything. A layer that ``include`` names but that cannot be modulated
    (e.g. an unsupported configuration) raises NotImplementedError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if type(model) in MODULATED_LAYERS:
        raise TypeError("convert replaces submodules in place: wrap a lone layer in a container, "
                        f"or use {MODULATED_LAYERS[type(model)].__name__}(layer)")
    if not isinstance(strict, bool):
        raise TypeError(f"convert: strict must be a bool, got {type(strict).__name__}")
    existing = [m for _, m in model.named_modules() if isinstance(m, (ModulatedLayer, PerTaskModule))]
    if existing and existing[0].num_tasks > 1:
        raise ValueError(
            f"convert: the model already has tasks {existing[0].task_names}; convert every layer "
            "before adding tasks, so that all layers share the same tasks"
        )
    inc, exc = _matcher(include, "include"), _matcher(exclude, "exclude", default=False)
    keep, shared_match = _matcher(per_task, "per_task", default=False), _matcher(shared, "shared", default=False)
    direct = _direct_readers(model)
    aliases = module_names(model)

    def any_name(match, module: nn.Module) -> bool:  # a filter names a reused module by any of its names
        return any(match(alias) for alias in aliases[id(module)])

    plan, copies, skipped, chosen, inside = [], [], [], [], []

    def skip(name: str, reason: str, by_choice: bool = False) -> None:
        skipped.append((name, reason))
        if by_choice:
            chosen.append(name)

    root_own = _own_parameters(model)
    if root_own:  # the model's own parameters (a class token, ...): named "" like the root in named_modules
        skip("", f"{type(model).__name__}'s own parameters {root_own} stay frozen and shared by every task "
                 "(shared=[''] acknowledges this)", by_choice=shared is not None and shared_match(""))
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (ModulatedLayer, PerTaskModule)):
            inside.append(name)
            continue
        if per_task is not None and any_name(keep, module):
            if name in direct:
                raise ValueError(f"convert: per_task names {name!r}, but {direct[name]}")
            copies.append((name, module))
            inside.append(name)
            continue
        own = _own_parameters(module)
        if isinstance(module, NORM_TYPES) and not any_name(shared_match, module):
            stateful = bool(own) or any(True for _ in module.buffers(recurse=False))
            if stateful and name in direct:
                skip(name, direct[name])
            elif stateful:
                copies.append((name, module))
                inside.append(name)
            continue
        kind = MODULATED_LAYERS.get(type(module))
        if kind is None and not own:
            continue  # a container, or a module without weights of its own
        if any_name(shared_match, module):
            skip(name, "shared= names it: frozen and shared by every task", by_choice=True)
        elif not any_name(inc, module):
            skip(name, f"not matched by include={include!r}: frozen and shared by every task", by_choice=True)
        elif any_name(exc, module):
            skip(name, f"excluded by exclude={exclude!r}: frozen and shared by every task", by_choice=True)
        elif name in direct:
            skip(name, direct[name])
        elif kind is None:
            skip(name, _unsupported_reason(module))
        else:
            plan.append((name, module, kind))
    if include is not None and isinstance(include, (str, list, tuple)) and not plan:
        kinds = "/".join(f"nn.{k.__name__}" for k in MODULATED_LAYERS)
        raise ValueError(f"convert: include={include!r} matched no {kinds} module")

    skipped = _note_ties(model, skipped, plan)
    # build everything first: an error leaves the model untouched
    built = []
    for name, module, kind in plan:
        try:
            built.append((name, module, _build(kind, module)))
        except NotImplementedError as e:
            if include is not None:
                raise NotImplementedError(f"convert: include names {name!r}, which cannot be modulated: {e}") from e
            skip(name, f"{e}; it stays frozen and shared (exclude=[name] acknowledges this)")
    built += [(name, module, PerTaskModule(module)) for name, module in copies]
    for name, module, _ in built:
        for alias in aliases[id(module)]:
            outer = [p for p in inside if alias.startswith(p + ".")]
            if outer:
                raise ValueError(f"convert: {name!r} is also reached as {alias!r}, inside {outer[0]!r} (copied per "
                                 "task or modulated as a whole): one module cannot be both")
    unsupported = [f"{n} ({r})" for n, r in skipped if n not in chosen]
    if strict and unsupported:
        raise ValueError(f"convert(strict=True): these modules hold weights that would stay frozen and shared by "
                         f"every task: {unsupported}")

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for _, module, wrapper in built:
        for alias in aliases[id(module)]:
            parent_name, _, attr = alias.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, wrapper)
    for p in model.parameters():
        p.requires_grad_(False)
    _REQUIRES_GRAD.setdefault(model, flags)  # what unload() restores (the flags before the first convert)
    if unsupported:
        warnings.warn(f"convert: left unmodulated (strict=True raises instead): {unsupported}", stacklevel=2)
    modulated = [name for name, _, wrapper in built if isinstance(wrapper, ModulatedLayer)]
    return Converted(modulated, skipped, [n for n, _ in copies], chosen)
