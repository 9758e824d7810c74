"""Post-hoc compression of naive (dense) tasks of a converted model with truncated SVDs.

:func:`compress_style` truncates one task's ``Gamma``/``B`` matrices (keep a fraction of the energy,
:func:`gmem.compress.truncate_energy`) and returns :class:`gmem.ops.LowRank` factors with their
errors; :func:`knowledge_base` builds a shared basis ``L, R`` from several tasks' matrices at once and
:func:`express_in_base` writes one matrix as ``L diag(lam) R^T + U diag(s) V^T``. These read the
model through :mod:`gmem.nn` (imported when called, so the compression core stays below it). The
training-time scheme of the paper's Algorithm 1 is :class:`gmem.compress.KnowledgeBase` (docs/design.md, section 4).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import nn as gnn  # gmem.nn may use the compression core: import it only when called
from ..nn.conv import ModulatedConvNd
from ..ops import LowRank
from .energy import truncate_energy

__all__ = ["compress_style", "compress_tasks", "knowledge_base", "express_in_base"]


def _conv_layers(model):

    return gnn, [(n, layer) for n, layer in gnn.modulated_layers(model) if isinstance(layer, ModulatedConvNd)]


def compress_style(model, task, keep: float = 0.99, groups=("gamma", "beta")) -> dict:
    """Low-rank versions of one task's conv style matrices.

    Returns ``{layer_name: {group: {"factors": LowRank, "rank": r, "full_rank": min(O, I),
    "rel_error": ||G - G_r||_F / ||G||_F}}}`` for every modulated conv of ``model`` (a converted
    network, e.g. ``mem.generator``). The factors plug into :func:`gmem.ops.modulated_conv2d`.
    """
    gnn, layers = _conv_layers(model)
    index = gnn.task_index(model, task)
    if index == 0:
        raise ValueError("compress_style: the source task is the frozen base; pick a learned task")
    out = {}
    for name, layer in layers:
        gamma, beta, _ = layer.dense_style(index)
        entry = {}
        for group, value in (("gamma", gamma), ("beta", beta)):
            if group not in groups:
                continue
            m = value.detach().double()
            u, s, v = truncate_energy(m, keep)
            approx = (u * s) @ v.T
            err = float(torch.linalg.norm(m - approx) / torch.linalg.norm(m).clamp_min(1e-30))
            entry[group] = {"factors": LowRank(u.to(value.dtype), s.to(value.dtype), v.to(value.dtype)),
                            "rank": int(s.numel()), "full_rank": min(m.shape), "rel_error": err}
        out[name] = entry
    return out


def knowledge_base(matrices: list[Tensor], keep: float = 0.9) -> tuple[Tensor, Tensor]:
    """A shared basis ``(L [O, k], R [I, k])`` for several tasks' matrices of one layer.

    Stacking the matrices side by side (for ``L``) and on top of each other (for ``R``) and keeping
    ``keep`` of the energy of each stack gives orthonormal column and row bases shared by the tasks.
    """
    if not matrices:
        raise ValueError("knowledge_base: need at least one matrix")
    shape = matrices[0].shape
    if any(m.shape != shape for m in matrices):
        raise ValueError(f"knowledge_base: matrices must share a shape, got {[tuple(m.shape) for m in matrices]}")
    left, _, _ = truncate_energy(torch.cat([m.double() for m in matrices], dim=1), keep)
    right, _, _ = truncate_energy(torch.cat([m.double().T for m in matrices], dim=1), keep)
    k = min(left.shape[1], right.shape[1])
    return left[:, :k].to(matrices[0].dtype), right[:, :k].to(matrices[0].dtype)


def express_in_base(matrix: Tensor, L: Tensor, R: Tensor, keep: float = 0.99,
                    own_rank: Optional[int] = None) -> tuple[LowRank, dict]:
    """``matrix ~= L C R^T + U diag(s) V^T`` as one LowRank (``P = [L|U]``, ``Q = [R|V]``).

    ``C = L^T matrix R`` is diagonalised by its SVD (``L' = L a``, ``R' = R b``); the residual outside the
    shared basis gets its own truncated SVD (``keep`` of its energy, or ``own_rank``). Returns the
    factors and ``{"shared_rank", "own_rank", "rel_error"}``.
    """
    m = matrix.double()
    Ld, Rd = L.double(), R.double()
    core = Ld.T @ m @ Rd
    a, lam, bh = torch.linalg.svd(core, full_matrices=False)
    shared_u, shared_v = Ld @ a, Rd @ bh.T
    residual = m - (shared_u * lam) @ shared_v.T
    if torch.linalg.norm(residual) <= 1e-6 * torch.linalg.norm(m):  # rounding noise: nothing of its own
        u, s, v = residual[:, :0], residual.new_zeros(0), residual.new_zeros(residual.shape[1], 0)
    else:
        u, s, v = truncate_energy(residual, keep)
    if own_rank is not None:
        u, s, v = u[:, :own_rank], s[:own_rank], v[:, :own_rank]
    factors = LowRank(torch.cat([shared_u, u], 1), torch.cat([lam, s]), torch.cat([shared_v, v], 1))
    err = float(torch.linalg.norm(m - factors.dense()) / torch.linalg.norm(m).clamp_min(1e-30))
    dtype = matrix.dtype
    return (LowRank(factors.u.to(dtype), factors.s.to(dtype), factors.v.to(dtype)),
            {"shared_rank": int(lam.numel()), "own_rank": int(s.numel()), "rel_error": err})


def compress_tasks(model, tasks, keep_base: float = 0.9, keep_own: float = 0.99, group: str = "gamma") -> dict:
    """Compress several tasks' conv ``Gamma`` (or ``B``: ``group="beta"``) with a shared knowledge base.

    For every modulated conv of ``model`` (e.g. ``mem.generator``; ``tasks`` names its learned tasks)
    a basis ``L, R`` is built from all tasks' matrices (:func:`knowledge_base`, ``keep_base`` of the
    energy) and each task is expressed as ``L diag(lam) R^T`` + its own truncated residual
    (:func:`express_in_base`, ``keep_own``). Returns ``{"layers": {name: {"shared_rank", "tasks":
    {task: {"factors": LowRank, "own_rank", "rel_error"}}}}, "dense_values", "compressed_values",
    "max_rel_error"}`` where the value counts compare storing the dense matrices with storing
    ``L, R`` once plus each task's ``lam`` and residual factors. Nothing in ``model`` is changed.
    """
    if group not in ("gamma", "beta"):
        raise ValueError(f"compress_tasks: group must be 'gamma' or 'beta', got {group!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("compress_tasks: need at least one task")
    gnn, layers = _conv_layers(model)
    indices = [gnn.task_index(model, t) for t in tasks]
    if 0 in indices:
        raise ValueError("compress_tasks: the source task is the frozen base; list learned tasks only")
    pos = 0 if group == "gamma" else 1
    report, dense, compressed, worst = {}, 0, 0, 0.0
    for name, layer in layers:
        mats = [layer.dense_style(i)[pos].detach() for i in indices]
        L, R = knowledge_base(mats, keep_base)
        out, o, i = {}, mats[0].shape[0], mats[0].shape[1]
        compressed += (o + i) * L.shape[1]
        for t, m in zip(tasks, mats):
            factors, info = express_in_base(m, L, R, keep_own)
            out[t] = {"factors": factors, **info}
            dense += o * i
            compressed += info["shared_rank"] + info["own_rank"] * (o + i + 1)
            worst = max(worst, info["rel_error"])
        report[name] = {"shared_rank": int(L.shape[1]), "tasks": out}
    return {"layers": report, "dense_values": dense, "compressed_values": compressed, "max_rel_error": worst}
