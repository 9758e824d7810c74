"""The knowledge base of one compressed style matrix (the paper's Algorithm 1, after each task).

A :class:`KnowledgeBase` belongs to one style matrix of one layer (``Gamma`` or ``B`` of a conv,
``[O, I]``; a compressed conv has two). It holds columns ``L [O, K]``, ``R [I, K]`` that only grow:
each task appends the leading singular vectors of its trained residual ``E_t``. Task ``t`` is stored
as ``lam_t`` (its coefficients over the ``K_{t-1}`` columns that existed when it was learned) and its
new columns ``(u_t [O, r_t], s_t [r_t], v_t [I, r_t])``; its matrix is

    G_t = L[:, :K_t] diag(q_t) R[:, :K_t]^T,   q_t = [lam_t; s_t],   K_t = K_{t-1} + r_t,

which :meth:`KnowledgeBase.express` returns as a :class:`gmem.ops.LowRank` without densifying.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from ..ops import LowRank
from .energy import EnergyRule, RankRule, ResidualEnergyRule, _check_matrix, rank_rule

__all__ = ["KnowledgeBase", "fit_coefficients"]

_KEY = re.compile(r"^tasks\.(?P<name>.+)\.(?P<field>position|lam|u|s|v)$")


@dataclass(frozen=True)
class _Task:
    lam: Tensor  # [K_{t-1}] coefficients over the earlier columns
    u: Tensor  # [O, r] new columns of L
    s: Tensor  # [r] their coefficients (singular values of E_t)
    v: Tensor  # [I, r] new columns of R
    start: int  # index of the first new column (= K_{t-1})

    @property
    def end(self) -> int:  # K_t: the task uses columns [0, end)
        return self.start + self.s.numel()


class KnowledgeBase:
    """Growing shared basis of one ``[O, I]`` style matrix, and the tasks expressed in it.

    ``KnowledgeBase(out_channels, in_channels, dtype, device)`` starts empty (``K = 0``). After task
    ``t`` is trained as :class:`LowRankStyle` (``lam_t [K]``, ``E_t [O, I]``), :meth:`add_task` truncates
    ``E_t`` and appends the kept columns. Tensors returned by :meth:`columns` and :meth:`express` are
    views of the stored ones: do not modify them in place.
    """

    def __init__(self, out_channels: int, in_channels: int, dtype: torch.dtype = torch.float32, device=None):
        for what, n in (("out_channels", out_channels), ("in_channels", in_channels)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"KnowledgeBase: {what} must be a positive int, got {n!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"KnowledgeBase: dtype must be a floating dtype, got {dtype!r}")
        self.shape = torch.Size((out_channels, in_channels))
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._tasks: dict[str, _Task] = {}
        self._L = torch.zeros(out_channels, 0, dtype=dtype, device=self.device)
        self._R = torch.zeros(in_channels, 0, dtype=dtype, device=self.device)

    # ---- reading ---------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """``K``: the number of columns of ``L`` and ``R``."""
        return self._L.shape[1]

    @property
    def tasks(self) -> list[str]:
        """Task names in the order they were added."""
        return list(self._tasks)

    def __contains__(self, task: str) -> bool:
        return task in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"KnowledgeBase(shape={tuple(self.shape)}, rank={self.rank}, tasks={self.tasks}, dtype={self.dtype})"

    def entry(self, task: str) -> "_Task":
        if task not in self._tasks:
            raise KeyError(f"KnowledgeBase: no task {task!r}; tasks are {self.tasks}")
        return self._tasks[task]

    def columns(self) -> tuple[Tensor, Tensor]:
        """``(L [O, K], R [I, K])``, the frozen base the next task trains on."""
        return self._L, self._R

    def column_tasks(self) -> list[str]:
        """``[K]``: the task that added each column."""
        out = []
        for name, t in self._tasks.items():
            out += [name] * t.s.numel()
        return out

    def coefficients(self, task: str) -> Tensor:
        """``q_t [K_t] = [lam_t; s_t]``: the task's coefficients over the columns it uses."""
        t = self.entry(task)
        return torch.cat([t.lam, t.s])

    def next_coefficients(self) -> Tensor:
        """Initial ``lam [K]`` for the next task: the last task's ``q`` (empty before the first task)."""
        if not self._tasks:
            return self._L.new_zeros(0)
        return self.coefficients(next(reversed(self._tasks)))

    def express(self, task: str) -> LowRank:
        """``G_t`` as ``LowRank(P_t [O, K_t], q_t [K_t], Q_t [I, K_t])`` with ``P_t = [L_used | U_t]``."""
        t = self.entry(task)
        return LowRank(self._L[:, : t.end], self.coefficients(task), self._R[:, : t.end])

    def express_stack(self, tasks: Iterable[str]) -> LowRank:
        """Several tasks as one LowRank with a task dimension: ``[T, O, K_max]``, ``[T, K_max]``, ``[T, I, K_max]``.

        Every task uses a leading block of the same columns, so the factors are the shared
        ``L[:, :K_max]``, ``R[:, :K_max]`` (expanded, no copy) and each ``q_t`` padded with zeros.
        """
        names = list(tasks)
        if not names:
            raise ValueError("KnowledgeBase.express_stack: need at least one task")
        k = max(self.entry(n).end for n in names)
        q = self._L.new_zeros(len(names), k)
        for row, n in enumerate(names):
            c = self.coefficients(n)
            q[row, : c.numel()] = c
        t = len(names)
        return LowRank(self._L[:, :k].expand(t, -1, -1), q, self._R[:, :k].expand(t, -1, -1))

    def dense(self, task: str) -> Tensor:
        """``G_t [O, I]`` densified (for tests and studies; sampling goes through :meth:`express`)."""
        return self.express(task).dense()

    def stored_values(self, task: Optional[str] = None) -> int:
        """Values stored for ``task`` (``lam_t``, ``u_t``, ``s_t``, ``v_t``), or for all tasks when None.

        The base is the union of the tasks' new columns, so the total over tasks is everything stored.
        A naive task stores ``O * I`` values.
        """
        names = self.tasks if task is None else [task]
        return sum(sum(x.numel() for x in (t.lam, t.u, t.s, t.v)) for t in map(self.entry, names))

    def tasks_using(self, columns: Iterable[int]) -> list[str]:
        """The tasks whose expression uses any of the column indices ``columns`` (each in ``0..K-1``)."""
        cols = [int(c) for c in columns]
        for c in cols:
            if not 0 <= c < self.rank:
                raise IndexError(f"KnowledgeBase.tasks_using: column {c} out of range 0..{self.rank - 1}")
        if not cols:
            return []
        first = min(cols)
        return [name for name, t in self._tasks.items() if t.end > first]

    # ---- growing and shrinking -------------------------------------------------------------------
    def add_task(self, name: str, lam: Tensor, residual: Tensor, keep: Union[None, float, RankRule] = None) -> dict:
        """Store a trained task: truncate its residual and append the kept columns.

        ``lam [K]``: the task's trained coefficients on the current base; ``residual [O, I]``: its
        trained ``E_t``. ``keep``: a :class:`gmem.compress.energy.RankRule` (None: the default
        :class:`ResidualEnergyRule`), or a fraction for the released energy rule, :class:`EnergyRule`
        (``"width"``: :func:`width_fraction` of ``O``). The energy rule (the released
        code's): with ``s`` the singular values of ``E_t`` and ``b = sum |lam_t|`` the energy the base
        already holds for this task, keep the fewest ``r`` with ``b + s[:r].sum() >= keep * (b + s.sum())``
        (:func:`residual_rank`); ``r = 0`` when the base alone reaches ``keep``. Truncating the residual
        alone would instead require ``s[:r].sum() >= keep * s.sum()``; counting ``b`` keeps fewer (never
        more) columns, and the fewer the better the base already explains the task, at the price that
        the error is measured against ``G_t``'s energy rather than ``E_t``'s (a residual that is small
        next to the base may be dropped entirely). ``b`` is an upper bound of the nuclear norm of
        ``L diag(lam_t) R^T`` (the columns of different tasks are not mutually orthogonal).

        Returns ``{"new_rank", "residual_rank", "keep", "base_energy", "kept_energy", "rel_error",
        "dropped_energy", "capped"}``: ``kept_energy`` is the reached fraction, ``rel_error =
        ||G_t - Ĝ_t||_F / ||G_t||_F`` (float64), ``dropped_energy`` the residual's dropped singular values'
        sum (a bound of ``||G_t - Ĝ_t||_F``), ``capped`` whether the rule's budget cut the rank below
        what its energy target asked for.
        """
        self._check_new_name(name)
        lam = self._check_lam(lam, "lam")
        _check_matrix(residual, "KnowledgeBase.add_task: residual")
        if residual.shape != self.shape:
            raise ValueError(f"KnowledgeBase.add_task: residual must be {tuple(self.shape)}, "
                             f"got {tuple(residual.shape)}")
        rule = rank_rule(keep)
        e = residual.detach().to(device=self.device, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        base_energy = float(lam.double().abs().sum())
        r = int(rule(s, base_energy, self.shape[0], self.shape[1]))
        if not 0 <= r <= s.numel():
            raise ValueError(f"KnowledgeBase.add_task: the rank rule {rule!r} returned {r}, not in 0..{s.numel()}")
        keep = rule.fraction(self.shape[0]) if isinstance(rule, EnergyRule) else rule.describe()
        wanted = rule.energy_rank(s, base_energy) if isinstance(rule, ResidualEnergyRule) else r
        g = (self._L.double() * lam.double()) @ self._R.double().T + e
        self.add_task_factors(name, lam, u[:, :r].to(self.dtype), s[:r].to(self.dtype), vh[:r].T.to(self.dtype))
        total = base_energy + float(s.sum())
        err = torch.linalg.norm(g - self.express(name).dense().double()) / torch.linalg.norm(g).clamp_min(1e-300)
        return {"new_rank": r, "residual_rank": int((s > 0).sum()), "keep": keep, "base_energy": base_energy,
                "kept_energy": (base_energy + float(s[:r].sum())) / total if total > 0 else 1.0,
                "rel_error": float(err), "dropped_energy": float(s[r:].sum()), "capped": r < wanted}

    def add_task_factors(self, name: str, lam: Tensor, u: Tensor, s: Tensor, v: Tensor) -> None:
        """Append a task given exactly: ``lam [K]`` over the current columns and new ``u [O, r], s [r], v [I, r]``."""
        self._check_new_name(name)
        lam = self._check_lam(lam, "lam")
        for what, t in (("u", u), ("s", s), ("v", v)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"KnowledgeBase.add_task_factors: {what} must be a float tensor")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"KnowledgeBase.add_task_factors: {what} contains NaN or Inf")
        r = s.shape[0] if s.ndim == 1 else -1
        if r < 0 or u.shape != (self.shape[0], r) or v.shape != (self.shape[1], r):
            raise ValueError(f"KnowledgeBase.add_task_factors: expected u [{self.shape[0]}, r], s [r], "
                             f"v [{self.shape[1]}, r], got {tuple(u.shape)}, {tuple(s.shape)}, {tuple(v.shape)}")
        cast = dict(dtype=self.dtype, device=self.device)
        task = _Task(lam.to(**cast).clone(), u.detach().to(**cast).clone(), s.detach().to(**cast).clone(),
                     v.detach().to(**cast).clone(), self.rank)
        self._tasks[name] = task
        if r:
            self._L = torch.cat([self._L, task.u], 1)
            self._R = torch.cat([self._R, task.v], 1)

    def remove_task(self, name: str) -> None:
        """Remove a task; refused (ValueError naming them) while later tasks use its columns."""
        t = self.entry(name)
        users = [n for n in self.tasks_using(range(t.start, t.end)) if n != name]
        if users:
            raise ValueError(f"KnowledgeBase: cannot remove task {name!r}: its basis columns "
                             f"{t.start}..{t.end - 1} are used by later tasks {users}")
        del self._tasks[name]
        if t.end > t.start:  # nobody later uses them, so they are the last columns
            self._L, self._R = self._L[:, : t.start].clone(), self._R[:, : t.start].clone()

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "KnowledgeBase":
        """A copy on ``device`` / in ``dtype``."""
        out = KnowledgeBase(self.shape[0], self.shape[1], dtype or self.dtype, device or self.device)
        for name, t in self._tasks.items():
            out.add_task_factors(name, t.lam, t.u, t.s, t.v)
        return out

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"KnowledgeBase: a task name must be a non-empty str, got {name!r}")
        if name in self._tasks:
            raise ValueError(f"KnowledgeBase: task {name!r} already exists")

    def _check_lam(self, lam: Tensor, what: str) -> Tensor:
        if not isinstance(lam, Tensor) or not lam.is_floating_point() or lam.shape != (self.rank,):
            raise ValueError(f"KnowledgeBase: {what} must be a float tensor [K] = [{self.rank}] (one coefficient per "
                             f"base column), got {getattr(lam, 'dtype', type(lam).__name__)} "
                             f"{tuple(getattr(lam, 'shape', ()))}")
        if not bool(torch.isfinite(lam).all()):
            raise ValueError(f"KnowledgeBase: {what} contains NaN or Inf")
        return lam.detach().to(self.device)

    # ---- flat tensor dicts (safetensors) ---------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """A flat ``{str: Tensor}`` dict: ``"shape"`` (int64 [2]) and per task ``tasks.<name>.position``
        (int64 []), ``.lam``, ``.u``, ``.s``, ``.v``. The base is not stored twice: ``L, R`` are the
        tasks' ``u, v`` in position order. The keys of one task (prefix ``tasks.<name>.``) can go to a
        file of their own. Tensors are contiguous CPU copies."""
        out = {"shape": torch.tensor(list(self.shape), dtype=torch.int64)}
        for pos, (name, t) in enumerate(self._tasks.items()):
            p = f"tasks.{name}."
            out[p + "position"] = torch.tensor(pos, dtype=torch.int64)
            for field in ("lam", "u", "s", "v"):
                out[p + field] = getattr(t, field).detach().cpu().contiguous().clone()
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], device=None) -> "KnowledgeBase":
        """Rebuild from :meth:`state_dict` output; bad or missing entries raise KeyError/ValueError naming the key.

        The dtype is the factors'; a base without tasks (only ``"shape"``) comes back as float32.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"KnowledgeBase.from_state_dict: expected a mapping, got {type(state).__name__}")
        shape = _entry(state, "shape")
        if shape.dtype != torch.int64 or shape.shape != (2,) or bool((shape < 1).any()):
            raise ValueError(f"KnowledgeBase.from_state_dict: 'shape' must be int64 [2] of positive sizes, "
                             f"got {shape.dtype} {tuple(shape.shape)}")
        fields: dict[str, dict[str, Tensor]] = {}
        for key in state:
            if key == "shape":
                continue
            m = _KEY.match(key) if isinstance(key, str) else None
            if m is None:
                raise ValueError(f"KnowledgeBase.from_state_dict: unexpected key {key!r}")
            fields.setdefault(m["name"], {})[m["field"]] = _entry(state, key)
        order = []
        for name, f in fields.items():
            pos = _entry(f, "position", f"tasks.{name}.position")
            if pos.dtype != torch.int64 or pos.ndim != 0:
                raise ValueError(f"KnowledgeBase.from_state_dict: 'tasks.{name}.position' must be an int64 scalar")
            order.append((int(pos), name))
        order.sort()
        if [p for p, _ in order] != list(range(len(order))):
            raise ValueError(f"KnowledgeBase.from_state_dict: task positions must be 0..{len(order) - 1}, got "
                             f"{ {n: p for p, n in order} }")
        dtypes = {f[k].dtype for f in fields.values() for k in ("lam", "u", "s", "v") if k in f}
        dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
        if len(dtypes) > 1:
            raise ValueError(f"KnowledgeBase.from_state_dict: factors have mixed dtypes {sorted(map(str, dtypes))}")
        base = cls(int(shape[0]), int(shape[1]), dtype, device)
        for _, name in order:
            p = f"tasks.{name}."
            t = {k: _entry(fields[name], k, p + k) for k in ("lam", "u", "s", "v")}
            for k, x in t.items():
                if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
                    raise ValueError(f"KnowledgeBase.from_state_dict: {p + k!r} must be finite floats")
            r = t["s"].shape[0] if t["s"].ndim == 1 else -1
            expect = {"lam": (base.rank,), "u": (base.shape[0], r), "s": (r,), "v": (base.shape[1], r)}
            for k, want in expect.items():
                if r < 0 or tuple(t[k].shape) != want:
                    raise ValueError(f"KnowledgeBase.from_state_dict: {p + k!r} has shape {tuple(t[k].shape)}, "
                                     f"expected {want if r >= 0 else '[r]'}")
            if bool((t["s"] < 0).any()):
                raise ValueError(f"KnowledgeBase.from_state_dict: {p + 's'!r} has negative values")
            base.add_task_factors(name, t["lam"], t["u"], t["s"], t["v"])
        return base


def _entry(state: Mapping, key: str, label: Optional[str] = None) -> Tensor:
    label = label or key
    if key not in state:
        raise KeyError(f"KnowledgeBase.from_state_dict: missing entry {label!r}")
    value = state[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"KnowledgeBase.from_state_dict: {label!r} must be a Tensor, got {type(value).__name__}")
    return value



def fit_coefficients(base: KnowledgeBase, matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Write a dense ``matrix [O, I]`` (a naive task's ``Gamma`` or ``B``) on ``base``: ``(lam [K], E [O, I])``.

    ``lam`` minimises ``||matrix - L diag(lam) R^T||_F`` (least squares through the ``[K, K]`` Gram
    matrix ``(L^T L) * (R^T R)``, pseudo-inverse for dependent columns) and ``E`` is what is left, so
    ``base.add_task(name, lam, E)`` stores the task as if it had been trained on the base.
    """
    _check_matrix(matrix, "fit_coefficients: matrix")
    if matrix.shape != base.shape:
        raise ValueError(f"fit_coefficients: matrix must be {tuple(base.shape)}, got {tuple(matrix.shape)}")
    L, R = (x.double() for x in base.columns())
    g = matrix.detach().to(device=base.device, dtype=torch.float64)
    gram = (L.T @ L) * (R.T @ R)
    rhs = ((L.T @ g) * R.T).sum(1)
    lam = (torch.linalg.pinv(gram, hermitian=True) @ rhs).to(base.dtype)
    residual = g - (L * lam.double()) @ R.T
    return lam, residual.to(base.dtype)
