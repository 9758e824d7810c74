"""Task banks keyed by name, and the per-call task selection every task-aware module reads.

Two kinds of modules hold per-task state: the modulated layers (a style set per task) and the
per-task copies of shared modules such as normalisation layers. Both keep their tasks in an
``nn.ModuleDict`` keyed by the *task name* (encoded, see :func:`encode_task`), so that state-dict
keys carry the name (``layer.styles.faces.gamma``) and ``load_state_dict`` matches tasks by name
whatever order two models added them in. The task *index* of a model is the position of the name in
its ordered task list (``"source"`` = 0); indices are a convenience of one model, names the identity.

Which task runs is not stored on the modules: :func:`select` sets a :mod:`contextvars` value mapping
each module to a :class:`Selection` for the duration of a ``with`` block. Every thread and every
asyncio task sees its own value, so concurrent callers selecting different tasks on one model never
see each other's choice; the mapping is keyed by module object, so two models do not interfere.
Outside any block a module falls back to its own defaults (``active_task``, ``task_ids``, ...), set
by :func:`gmem.nn.set_task` or directly on a stand-alone layer.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping, NamedTuple, Optional
from urllib.parse import unquote

from torch import Tensor, nn

__all__ = ["Selection", "TaskBank", "encode_task", "decode_task", "select", "current_selection"]


def encode_task(name: str) -> str:
    """A task name as a ``ModuleDict`` key, reversibly (:func:`decode_task`).

    ``.`` (a state-dict separator), ``%`` (the escape itself), whitespace and unprintable
    characters become ``%XX`` (UTF-8 bytes); a name that would shadow a ``ModuleDict`` attribute
    (``"keys"``, ``"training"``, ...) gets its first character escaped too.
    """
    out = []
    for ch in name:
        if ch in ".%" or ch.isspace() or not ch.isprintable():
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    key = "".join(out)
    if key and hasattr(_PROBE, key):
        first = key[0]
        key = "".join(f"%{b:02X}" for b in first.encode("utf-8")) + key[1:]
    return key


def decode_task(key: str) -> str:
    """The task name of a ``ModuleDict`` key made by :func:`encode_task`."""
    return unquote(key, encoding="utf-8", errors="strict")


_PROBE = nn.ModuleDict()


class Selection(NamedTuple):
    """What one task-aware module runs in one call.

    ``task``: index of the single task (when ``task_ids`` is None); ``task_ids``: LongTensor ``[N]``,
    one task index per sample; ``override``: values used instead of a stored task (interpolation;
    its form belongs to the module); ``class_ids``: LongTensor ``[N]`` for conditional tasks.
    """

    task: int = 0
    task_ids: Optional[Tensor] = None
    override: Any = None
    class_ids: Optional[Tensor] = None


# The value is a plain dict (dynamo traces dict lookups keyed by modules, not mappingproxy ones)
# that is never mutated once set: select() builds a new one.
_EMPTY: dict = {}
_SELECTION: contextvars.ContextVar[dict] = contextvars.ContextVar("gmem_nn_selection", default=_EMPTY)


def current_selection(module: nn.Module) -> Optional[Selection]:
    """The selection a ``with`` block set for ``module`` in this thread/task, or None."""
    return _SELECTION.get().get(module)


@contextlib.contextmanager
def select(changes: Mapping["TaskBank", dict]) -> Iterator[None]:
    """Context manager: each module's selection updated by its dict of :class:`Selection` fields.

    Fields not named keep the value of the enclosing block (or the module's defaults), so
    ``use_classes`` nests inside ``use_task``. The previous value is restored on exit, errors included.
    """
    outer = _SELECTION.get()
    inner = dict(outer)
    for module, fields in changes.items():
        base = outer.get(module)
        if base is None:
            base = module.default_selection()
        inner[module] = base._replace(**fields)
    token = _SELECTION.set(inner)
    try:
        yield
    finally:
        _SELECTION.reset(token)


class TaskBank(nn.Module):
    """Base of the task-aware modules: ordered task names, a name-keyed bank, the selection.

    Subclasses name their bank attribute in ``bank_attr`` (an ``nn.ModuleDict`` with one entry per
    task other than the source) and implement ``make_entry(name, init_index, **options)``.
    """

    bank_attr: str = "styles"

    def _init_bank(self) -> None:
        self.task_names: list[str] = ["source"]
        setattr(self, self.bank_attr, nn.ModuleDict())
        # defaults used outside any selection block (gmem.nn.set_task, a stand-alone layer)
        self.active_task: int = 0
        self.task_ids: Optional[Tensor] = None
        self.class_ids: Optional[Tensor] = None
        self.style_override: Any = None

    @property
    def bank(self) -> nn.ModuleDict:
        return getattr(self, self.bank_attr)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def entry(self, index: int) -> nn.Module:
        """The bank entry of task ``index >= 1``."""
        return self.bank[encode_task(self.task_names[index])]

    def default_selection(self) -> Selection:
        return Selection(self.active_task, self.task_ids, self.style_override, self.class_ids)

    def selection(self) -> Selection:
        """What this call runs: the innermost ``with`` block's choice, else the module's defaults."""
        sel = _SELECTION.get().get(self)
        return self.default_selection() if sel is None else sel

    def make_entry(self, name: str, init: int, **options) -> nn.Module:
        raise NotImplementedError

    def add_entry(self, name: str, entry: nn.Module) -> None:
        """Append task ``name`` with its (already built) bank entry."""
        self.bank[encode_task(name)] = entry
        self.task_names.append(name)

    def remove_entry(self, index: int) -> None:
        if index == 0:
            raise ValueError("the source task is the frozen base and cannot be removed")
        del self.bank[encode_task(self.task_names[index])]
        del self.task_names[index]
        if self.active_task == index:
            self.active_task = 0
        elif self.active_task > index:
            self.active_task -= 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not strict:
            return
        # Name the tasks, not only the keys: the usual cause is a model that lacks a task
        start = prefix + self.bank_attr + "."
        found = {decode_task(k[len(start):].split(".", 1)[0]) for k in state_dict if k.startswith(start)}
        here = set(self.task_names[1:])
        where = prefix[:-1] or "the model"
        if found - here:
            error_msgs.append(
                f"{where}: the state dict holds tasks {sorted(found - here)} that this model lacks "
                f"(it has {self.task_names}); add them first with gmem.nn.add_task(model, name)"
            )
        if here - found:
            error_msgs.append(f"{where}: tasks {sorted(here - found)} of this model are missing from the state dict")
