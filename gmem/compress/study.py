"""Study outputs: singular-value spectra per layer (the paper's Figures 4a and 14) and small tables."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import torch
from torch import Tensor

from ..atomic import atomic_write_path
from ..nn import task_index
from .base import KnowledgeBase
from .energy import energy_rank
from .knowledge import DEFAULT_LAYERS
from .layers import select_layers

__all__ = ["style_matrices", "singular_values", "plot_singular_values", "energy_table", "storage_table"]


def style_matrices(mem, task: str, layers=None) -> dict[str, Tensor]:
    """``{"<layer>.gamma" | "<layer>.beta": matrix [O, I]}``: a naive task's style matrices of the layers
    ``layers`` selects (default: the compressed layers, B0-B3 and the fc), convs as ``Gamma``/``B`` ``[C_out, C_in]``,
    a GP-GAN fc's ``gamma``/``beta`` seen as ``[16 nf, s0^2]`` (:mod:`gmem.compress.layers`)."""

    index = task_index(mem.generator, mem.task_name(task))
    out = {}
    for name, layer, shape in select_layers(mem.generator, DEFAULT_LAYERS if layers is None else layers):
        if layer.entry_kind(index) != "dense":
            raise ValueError(f"style_matrices: task {task!r} is stored compressed in {name!r}; give a naive task")
        entry = layer.entry(index)
        out[f"{name}.gamma"] = entry.gamma.detach().reshape(shape)
        out[f"{name}.beta"] = entry.beta.detach().reshape(shape)
    return out


def singular_values(matrices: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: s [min(O, I)]}`` (float64, descending) for ``{name: matrix [O, I]}``."""
    out = {}
    for name, m in matrices.items():
        if not isinstance(m, Tensor) or m.ndim != 2 or not m.is_floating_point():
            raise ValueError(f"singular_values: {name!r} must be a float matrix [O, I], got "
                             f"{getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"singular_values: {name!r} contains NaN or Inf")
        out[name] = torch.linalg.svdvals(m.detach().double().cpu())
    return out


def plot_singular_values(spectra: Mapping[str, Tensor], path, normalise: bool = True, title: str = "") -> None:
    """Plot each layer's singular values to a PNG at ``path`` (written atomically).

    ``spectra``: ``{layer: s [J]}`` (from :func:`singular_values`). With ``normalise`` the x axis is
    ``j / J`` and values are divided by the largest, so layers of different widths share the axes (as
    in the paper's figures); the y axis is logarithmic.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's state alone

    if not spectra:
        raise ValueError("plot_singular_values: no spectra given")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for name, s in spectra.items():
        s = s.detach().double().cpu()
        if s.numel() == 0:
            continue
        x = torch.arange(s.numel(), dtype=torch.float64)
        if normalise:
            x = x / s.numel()
            s = s / s[0].clamp_min(1e-300)
        ax.plot(x.numpy(), s.clamp_min(1e-12).numpy(), label=name, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("index j / J" if normalise else "index j")
    ax.set_ylabel("s_j / s_0" if normalise else "s_j")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def energy_table(spectra: Mapping[str, Tensor], keeps: Sequence[float] = (0.8, 0.9, 0.95, 0.99)) -> str:
    """A Markdown table: per layer the number of singular values ``J`` and the rank kept at each ``keep``."""
    head = "| layer | J | " + " | ".join(f"rank @ {k:g}" for k in keeps) + " |"
    rows = [head, "|" + "---|" * (2 + len(keeps))]
    for name, s in spectra.items():
        s = s.detach().double().cpu()
        rows.append(f"| {name} | {s.numel()} | " + " | ".join(str(energy_rank(s, k)) for k in keeps) + " |")
    return "\n".join(rows)


def storage_table(bases: Mapping[str, KnowledgeBase]) -> str:
    """A Markdown table in the paper's Table 1 layout: per task, naive vs stored style values.

    ``bases``: ``{matrix name: KnowledgeBase}`` of one model. A task's naive cost is ``O * I`` for each
    base holding it; the stored cost is :meth:`KnowledgeBase.stored_values`.
    """
    tasks: list[str] = []
    for b in bases.values():
        tasks += [t for t in b.tasks if t not in tasks]
    rows = ["| task | naive values | stored values | stored / naive |", "|---|---|---|---|"]
    for t in tasks:
        naive = sum(b.shape[0] * b.shape[1] for b in bases.values() if t in b)
        stored = sum(b.stored_values(t) for b in bases.values() if t in b)
        rows.append(f"| {t} | {naive:,} | {stored:,} | {100.0 * stored / naive:.1f}% |")
    return "\n".join(rows)
