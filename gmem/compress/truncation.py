"""Per-block truncation study of a naive task (the paper's Figure 4b): quality vs kept energy, one block at a time.

For one learned naive task and each generator block separately (the blocks are the selected layers
grouped by the name before their last dot: ``resnet_0_0`` holds ``conv_0`` and ``conv_1``; ``fc`` is a
block of its own, seen as its ``(16 nf) x (s0^2)`` matrices), every ``Gamma``/``B`` of the block is
replaced by its truncated SVD keeping ``f`` of the energy (:func:`gmem.compress.truncate_energy`), the
other blocks stay intact, and the task is sampled with fixed latents and scored. The score is a callable
``score(fake [n, C, H, W]) -> float`` (the study tool passes pixFID8 against the task's images, a proxy
for FID). Nothing of the memory changes: each block's entries are restored after it is scored.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..atomic import atomic_write_path
from ..nn import task_index
from .energy import _check_keep, truncate_energy
from .knowledge import DEFAULT_LAYERS
from .layers import select_layers

__all__ = ["truncation_study", "truncation_table", "plot_truncation", "FRACTIONS"]

#: Kept energy fractions of the study.
FRACTIONS = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)


def _blocks(G, layers) -> dict[str, list]:
    out: dict[str, list] = {}
    for name, layer, shape in select_layers(G, layers):
        out.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append((name, layer, shape))
    return out


def truncation_study(mem, task: str, score: Callable, fractions: Sequence[float] = FRACTIONS,
                     layers=DEFAULT_LAYERS, n: int = 256, seed: int = 0) -> dict:
    """Score ``task`` with one block truncated at a time.

    ``mem``: a :class:`gmem.GANMemory`; ``task``: a naive (dense) learned task; ``score(fake) -> float``
    (lower is better for FID-like scores); ``fractions``: kept energy values in [0, 1]; ``layers``: the
    layer selection (globs, see :mod:`gmem.compress.layers`) whose blocks are studied; ``n`` samples from
    latents ``seed``. Returns ``{"task", "fractions", "intact": score, "blocks": {block: {"layers": [...],
    "scores": [per fraction], "kept_rank": [per fraction, summed over the block's matrices],
    "full_rank": summed min(O, I)}}}``.
    """

    fractions = [_check_keep(f, "truncation fraction") for f in fractions]
    if not fractions:
        raise ValueError("truncation_study: need at least one fraction")
    name = mem.task_name(task)
    mem.ensure_loaded(name)
    G = mem.generator
    index = task_index(G, name)
    if index == 0:
        raise ValueError("truncation_study: the source is the frozen base; name a learned task")
    blocks = _blocks(G, layers)
    for block in blocks.values():
        for lname, layer, _ in block:
            if layer.entry_kind(index) != "dense":
                raise ValueError(f"truncation_study: task {name!r} is stored compressed in {lname!r}; "
                                 "study a naive task")
    z = mem.latents(n, seed=seed)
    out = {"task": name, "fractions": fractions, "intact": float(score(mem.sample(name, z=z))), "blocks": {}}
    for bname, block in blocks.items():
        originals = [(layer, layer.entry(index)) for _, layer, _ in block]
        scores, ranks = [], []
        full = sum(2 * min(shape) for _, _, shape in block)
        try:
            for f in fractions:
                kept = 0
                for (_, layer, shape), (_, entry) in zip(block, originals):
                    values = []
                    for g in (entry.gamma, entry.beta):
                        u, s, v = truncate_energy(g.detach().reshape(shape), f)
                        kept += s.numel()
                        values.append(((u * s) @ v.T).reshape(g.shape))
                    layer.set_entry(index, layer.style_cls(values[0], values[1], entry.bias.detach().clone()))
                scores.append(float(score(mem.sample(name, z=z))))
                ranks.append(kept)
        finally:
            for layer, entry in originals:
                layer.set_entry(index, entry)
        out["blocks"][bname] = {"layers": [n_ for n_, _, _ in block], "scores": scores, "kept_rank": ranks,
                                "full_rank": full}
    return out


def truncation_table(result: dict, metric: str = "pixFID8") -> str:
    """Markdown: per block the score at each kept fraction (and the kept / full rank of the block)."""
    fr = result["fractions"]
    rows = [f"Task {result['task']!r}; intact (no block truncated): {metric} {result['intact']:.3f}.", "",
            "| block | " + " | ".join(f"f = {f:g}" for f in fr) + " |", "|---|" + "---|" * len(fr)]
    for name, b in result["blocks"].items():
        cells = [f"{s:.3f} (rank {r}/{b['full_rank']})" for s, r in zip(b["scores"], b["kept_rank"])]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_truncation(result: dict, path, metric: str = "pixFID8 (proxy, lower is better)") -> None:
    """Figure 4b: one line per block, score vs kept energy fraction; the intact score dashed. PNG, atomic."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for name, b in result["blocks"].items():
        ax.plot(result["fractions"], b["scores"], "o-", label=name, linewidth=1.2)
    ax.axhline(result["intact"], color="grey", linestyle="--", linewidth=1, label="intact")
    ax.set_xlabel("kept energy fraction f (one block truncated)")
    ax.set_ylabel(metric)
    ax.set_title(f"per-block truncation, task {result['task']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
