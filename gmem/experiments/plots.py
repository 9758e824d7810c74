"""Figures and tables of the lifelong experiments (matplotlib, written atomically)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..atomic import atomic_write
from ..images import image_grid

__all__ = ["stage_grid", "save_figure", "plot_sample_grids", "plot_curves", "write_json", "markdown_table"]


def stage_grid(samples: dict[int, dict[str, torch.Tensor]], tasks: Sequence[str], per_task: int) -> torch.Tensor:
    """One image ``[C, H', W']``: row ``s`` = after stage ``s``, ``per_task`` samples of each task learned
    by then (black where a task is not learned yet). ``samples[stage][task]``: ``[>= per_task, C, H, W]``."""
    some = next(iter(next(iter(samples.values())).values()))
    blank = torch.full((per_task, *some.shape[1:]), -1.0)
    rows = []
    for stage in sorted(samples):
        for t in tasks:
            rows.append(samples[stage][t][:per_task] if t in samples[stage] else blank)
    return image_grid(torch.cat(rows), nrow=per_task * len(tasks))


def save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_sample_grids(grids: dict[str, torch.Tensor], tasks: Sequence[str], path, title: str = "") -> None:
    """One panel per method, stacked: the :func:`stage_grid` of each (the paper's Figure 5 layout)."""
    plt = _pyplot()
    some = next(iter(grids.values()))
    aspect = some.shape[2] / some.shape[1]
    width = min(10.0, max(4.0, 0.8 * aspect * len(tasks)))
    fig, axes = plt.subplots(len(grids), 1, figsize=(width, len(grids) * (width / aspect + 0.5)), squeeze=False)
    n = len(tasks)
    for ax, (method, grid) in zip(axes[:, 0], grids.items()):
        img = ((grid.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, interpolation="nearest")
        ax.set_title(method, fontsize=9)
        ax.set_xticks([(i + 0.5) * img.shape[1] / n for i in range(n)])
        ax.set_xticklabels(tasks, fontsize=8)
        ax.set_yticks([(i + 0.5) * img.shape[0] / n for i in range(n)])
        ax.set_yticklabels([f"after {i + 1}" for i in range(n)], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_curves(curves: dict[str, dict[str, dict[int, float]]], panels: Sequence[str], path, *, ylabel: str,
                xlabel: str = "after learning task", xticks: Optional[Sequence[str]] = None, title: str = "") -> None:
    """One panel per entry of ``panels``; in each, one line per method: ``curves[method][panel][stage]``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for method, per_panel in curves.items():
            points = sorted(per_panel.get(panel, {}).items())
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=method)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if xticks is not None:
            ax.set_xticks(range(1, len(xticks) + 1))
            ax.set_xticklabels(xticks, fontsize=7, rotation=20)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_json(obj, path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
