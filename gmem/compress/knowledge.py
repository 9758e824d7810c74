"""Compressed tasks in a converted generator: the knowledge bases of its convs and the task life cycle.

:class:`Knowledge` holds one :class:`KnowledgeBase` per compressed style matrix (``"<layer>.gamma"``,
``"<layer>.beta"``). A task is compressed in the convs that :class:`CompressionSettings` selects
(default: the generator blocks B0-B3, i.e. both 3x3 convs ``conv_0``, ``conv_1`` of ``resnet_0_0`` ..
``resnet_3_0``, the released code's choice, and the GP-GAN ``fc``'s ``gamma``/``beta``; B0 is the block
right after ``fc``, at 4x4; at 256 px these are the four widest blocks; the embedded 32 px base has
exactly these four blocks):

1. :func:`begin_task`: each selected conv's entry becomes a :class:`~gmem.nn.lowrank.TrainingLowRankStyle`:
   ``G = L diag(lam) R^T + E`` with ``lam`` from the previous task of that base (ones for none) and
   ``E = 0``; the first task of a base (``K = 0``) starts with ``E`` = the task's initial dense value
   (the source style), so every task starts where a naive one (or its predecessor) would.
2. :func:`make_prior` (a trainer :class:`~gmem.training.LossTerm`) adds the weighted nuclear norm
   of every ``E`` to the generator loss every ``prior_every`` iterations.
3. :func:`finish_task`: ``KnowledgeBase.add_task`` (energy rule with the base's energy, ``keep`` or
   the width fraction) and the entry becomes a stored :class:`~gmem.nn.lowrank.CompressedStyle`.

:func:`compress_dense_task` converts a naive task afterwards (``fit_coefficients`` + the same rule);
:func:`install_task` rebuilds a stored task from its file's ``lowrank`` keys. The bases' order and
column ranges are described by :meth:`Knowledge.index` (the memory's knowledge-base file).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .. import nn as gnn
from ..lowrank import PRIOR_WEIGHT, LowRankStyle, nuclear_prior
from ..nn.conv import ModulatedConvNd
from ..nn.layers import ModulatedLinear
from ..nn.lowrank import LOWRANK_FIELDS, CompressedStyle, TrainingLowRankStyle, entry_kind
from ..training import LossTerm
from .base import KnowledgeBase, fit_coefficients
from .energy import RankRule, rank_rule
from .layers import FC_LAYER, normalise_layers, select_layers

__all__ = ["DEFAULT_LAYERS", "RELEASED_LAYERS", "FC_LAYER", "CompressionSettings",
           "Knowledge", "make_prior", "index_order", "compressed_layers",
           "begin_task", "finish_task", "compress_dense_task", "install_task", "INDEX_FORMAT"]

#: The prior is added on iterations ``it`` with ``it % PRIOR_EVERY == 0`` (the released code's schedule).
PRIOR_EVERY = 10

#: Generator blocks B0-B3 (both convs of each), the released code's compressed layers.
RELEASED_LAYERS = ("resnet_0_0.conv_*", "resnet_1_0.conv_*", "resnet_2_0.conv_*", "resnet_3_0.conv_*")
#: The default: B0-B3 and the GP-GAN ``fc`` (its mFiLM ``gamma``/``beta`` as ``(16 nf) x (s0 * s0)``
#: matrices). With B0-B3 alone the fc's ``gamma``/``beta`` stay dense in every task: 2 x 16 nf s0^2 values,
#: 11% of a 32 px task, a floor above the 10% a later task otherwise reaches (compression study).
DEFAULT_LAYERS = RELEASED_LAYERS + (FC_LAYER,)
INDEX_FORMAT = "gmem-knowledge-v1"
GROUPS = ("gamma", "beta")


@dataclass
class CompressionSettings:
    """How a task is compressed. ``layers``: globs over generator layer names, or ``(glob, (rows, cols))``
    pairs for linear layers (see :mod:`gmem.compress.layers`; default :data:`DEFAULT_LAYERS`, B0-B3 and the
    GP-GAN fc; :data:`RELEASED_LAYERS`: B0-B3 only);
    ``keep``: the rank rule after a task, a :class:`gmem.compress.energy.RankRule` callable (None: the
    default :class:`~gmem.compress.energy.ResidualEnergyRule`), or the kept energy fraction of the
    released energy rule (:class:`EnergyRule`; ``"width"``: :func:`width_fraction` of each layer's width);
    ``prior_weight`` / ``prior_every``: the nuclear-norm prior's weight and period; ``weighted``:
    weighted (``eta_j``) or plain nuclear norm."""

    layers: tuple = DEFAULT_LAYERS
    keep: Union[None, float, RankRule] = None
    prior_weight: float = PRIOR_WEIGHT
    prior_every: int = PRIOR_EVERY
    weighted: bool = True

    def __post_init__(self):
        self.layers = normalise_layers(self.layers)
        if isinstance(self.keep, (int, float)):
            self.keep = rank_rule(self.keep).keep  # a fraction, checked
        elif self.keep is not None and not isinstance(self.keep, RankRule):
            self.keep = rank_rule(self.keep)  # "width" or a residual rule's description
        if not (isinstance(self.prior_weight, (int, float)) and self.prior_weight >= 0):
            raise ValueError(f"prior_weight must be a number >= 0, got {self.prior_weight!r}")
        if isinstance(self.prior_every, bool) or not isinstance(self.prior_every, int) or self.prior_every < 1:
            raise ValueError(f"prior_every must be an int >= 1, got {self.prior_every!r}")

    @classmethod
    def coerce(cls, value) -> Optional["CompressionSettings"]:
        """``False``/``None`` -> None; ``True`` -> defaults; a dict -> its fields; settings as they are."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"compress must be True/False, a dict of CompressionSettings fields or "
                        f"CompressionSettings, got {type(value).__name__}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep"] = rank_rule(self.keep).describe()  # JSON: the fraction, or the rule's description
        d["layers"] = [g if isinstance(g, str) else [g[0], list(g[1])] for g in self.layers]
        return d


def compressed_layers(G, layers=DEFAULT_LAYERS) -> list:
    """``[(name, layer)]`` of ``G`` that ``layers`` select (convs, and linear layers with a matrix view);
    ValueError if none. :func:`gmem.compress.layers.select_layers` also gives each one's matrix shape."""
    return [(n, m) for n, m, _ in select_layers(G, layers)]


class Knowledge:
    """The knowledge bases of a generator: ``{"<layer>.<gamma|beta>": KnowledgeBase}``."""

    def __init__(self):
        self.bases: dict[str, KnowledgeBase] = {}

    def pair(self, name: str, layer, create: bool = True, shape=None) -> tuple[KnowledgeBase, KnowledgeBase]:
        """The ``(gamma, beta)`` bases of layer ``name`` (created empty on the layer's device/dtype).

        ``shape``: the matrices' ``(rows, cols)`` (default: a conv's style shape, ``[C_out, C_in/groups]``,
        transposed ``[C_in, C_out/groups]``); ValueError if existing bases have another shape."""
        if shape is None:
            shape = tuple(layer.weight_std.shape)
        out = []
        for g in GROUPS:
            key = f"{name}.{g}"
            if key not in self.bases:
                if not create:
                    raise KeyError(f"no knowledge base {key!r}")
                w = layer.weight_std
                self.bases[key] = KnowledgeBase(int(shape[0]), int(shape[1]), w.dtype, w.device)
            elif tuple(self.bases[key].shape) != tuple(shape):
                raise ValueError(f"knowledge base {key!r} holds {tuple(self.bases[key].shape)} matrices, "
                                 f"not {tuple(shape)}")
            out.append(self.bases[key])
        return out[0], out[1]

    def tasks(self) -> list[str]:
        """Every task stored in some base (in first-seen order)."""
        seen: dict[str, None] = {}
        for kb in self.bases.values():
            seen.update(dict.fromkeys(kb.tasks))
        return list(seen)

    def __contains__(self, task: str) -> bool:
        return any(task in kb for kb in self.bases.values())

    def users(self, task: str) -> list[str]:
        """The other tasks whose expression uses basis columns that ``task`` added (in any base)."""
        users: dict[str, None] = {}
        for kb in self.bases.values():
            if task in kb:
                t = kb.entry(task)
                users.update(dict.fromkeys(n for n in kb.tasks_using(range(t.start, t.end)) if n != task))
        return list(users)

    def remove_task(self, task: str) -> None:
        """Drop ``task`` from every base; ValueError naming the tasks that use its columns (nothing changed)."""
        users = self.users(task)
        if users:
            raise ValueError(f"cannot remove task {task!r}: later compressed tasks {users} use the basis columns "
                             "it added to the knowledge base; remove them first")
        for key, kb in list(self.bases.items()):
            if task in kb:
                kb.remove_task(task)
            if not len(kb):
                del self.bases[key]

    def stored_values(self, task: str) -> int:
        """Values ``task`` stores in the bases (coefficients and new columns of every matrix)."""
        return sum(kb.stored_values(task) for kb in self.bases.values() if task in kb)

    def dense_values(self, task: str) -> int:
        """What the same matrices cost stored dense (``O * I`` each)."""
        return sum(kb.shape.numel() for kb in self.bases.values() if task in kb)

    def index(self) -> dict:
        """The bases' layout as JSON: per matrix its shape, dtype and ``[task, start, rank]`` in order."""
        mats = {}
        for key, kb in sorted(self.bases.items()):
            rows = []
            for name in kb.tasks:
                t = kb.entry(name)
                rows.append([name, t.start, t.end - t.start])
            mats[key] = {"shape": list(kb.shape), "dtype": str(kb.dtype).replace("torch.", ""), "tasks": rows}
        return {"format": INDEX_FORMAT, "matrices": mats}

    def to(self, device) -> None:
        """Move every base to ``device`` in place (entries keep referring to the same objects)."""
        for kb in self.bases.values():
            moved = kb.to(device=device)
            kb.__dict__.update(moved.__dict__)


def index_order(index: Optional[dict], task: str) -> list[str]:
    """Tasks listed before ``task`` in any matrix of a knowledge index (they must be loaded first)."""
    before: dict[str, None] = {}
    for mat in (index or {}).get("matrices", {}).values():
        names = [row[0] for row in mat["tasks"]]
        if task in names:
            before.update(dict.fromkeys(names[: names.index(task)]))
    return list(before)


def make_prior(styles: list[LowRankStyle], settings: CompressionSettings):
    """The :class:`gmem.training.LossTerm` of the low-rank prior over ``styles`` (their residuals ``E``)."""

    def value(ctx) -> Tensor:
        return sum(nuclear_prior(s.residual, weighted=settings.weighted, weight=1.0) for s in styles)

    return LossTerm(value, on="g", every=settings.prior_every, weight=settings.prior_weight, name="lowrank_prior")


def begin_task(G, task: str, knowledge: Knowledge, settings: CompressionSettings) -> list[LowRankStyle]:
    """Turn ``task``'s selected conv entries into training low-rank ones; returns the styles (for the prior)."""

    index = gnn.task_index(G, task)
    styles, plan = [], []
    for name, layer, shape in select_layers(G, settings.layers):
        gamma, beta, bias = layer.dense_style(index)
        pair = knowledge.pair(name, layer, shape=shape)
        flat = gamma.ndim == 1  # a linear layer: its vectors as [rows, cols] matrices (row-major)
        made = []
        for kb, init in zip(pair, (gamma.reshape(shape), beta.reshape(shape))):
            if kb.rank == 0:  # nothing to share yet: E carries the whole initial matrix
                made.append(LowRankStyle(*kb.columns(), residual=init.detach()))
            else:
                made.append(LowRankStyle.from_base(kb))
        plan.append((layer, TrainingLowRankStyle(made[0], made[1], bias, flat=flat)))
        styles += made
    for layer, entry in plan:
        layer.set_entry(index, entry)
    return styles


@contextlib.contextmanager
def _all_or_nothing(task: str, index: int):
    """Yield ``(added, plan)`` lists to fill: bases ``task`` was added to, ``(layer, entry)`` to set. If the
    block raises, ``task`` leaves those bases again and no entry changes; else every entry is set."""
    added, plan = [], []
    try:
        yield added, plan
    except BaseException:
        for kb in added:
            kb.remove_task(task)
        raise
    for layer, entry in plan:
        layer.set_entry(index, entry)


def _store(G, task: str, knowledge: Knowledge, settings_layers, matrices) -> dict:
    """Add ``task`` to the bases with ``matrices(name, layer, entry) -> ((lam, E) gamma, (lam, E) beta, bias)``
    and swap the entries for stored compressed ones; all or nothing.

    Never more than naive: a layer whose kept coefficients and columns (both matrices) would cost more
    values than its dense ``Gamma``/``B`` stays dense (a plain style set, not in the bases; its infos
    get ``"dense": True``, e.g. full-rank factors at keep 1.0 cost ``r (O + I + 1) > O I``; the task's
    record lists it in ``dense_layers`` and a warning names it). The default rule's budget keeps every
    layer below that."""

    index = gnn.task_index(G, task)
    info = {}
    with _all_or_nothing(task, index) as (added, plan):
        for name, layer, shape in select_layers(G, settings_layers):
            entry = layer.entry(index)
            got = matrices(name, layer, entry)
            if got is None:
                continue
            pair, (gamma, beta, bias, keep) = knowledge.pair(name, layer, shape=shape), got
            mine = {}
            for g, kb, (lam, residual) in zip(GROUPS, pair, (gamma, beta)):
                mine[f"{name}.{g}"] = kb.add_task(task, lam, residual, keep)
                added.append(kb)
            if sum(kb.stored_values(task) for kb in pair) > sum(kb.shape.numel() for kb in pair):
                for kb in pair:  # the factors cost more than the dense matrices: store this layer dense
                    kb.remove_task(task)
                    added.remove(kb)
                mine = {k: {**v, "dense": True, "rel_error": 0.0} for k, v in mine.items()}
                if entry_kind(entry) != "dense":
                    dense = (t.detach().clone() for t in (entry.gamma, entry.beta, entry.bias))
                    plan.append((layer, layer.style_cls(*dense)))
            else:
                plan.append((layer, CompressedStyle(pair, task, bias, flat=isinstance(layer, ModulatedLinear))))
            info.update(mine)
    return info


def finish_task(G, task: str, knowledge: Knowledge, settings: CompressionSettings) -> dict:
    """After training: truncate every ``E`` into the bases and store the task compressed.

    Returns ``{"<layer>.<group>": add_task info}`` (new rank, kept energy, relative error). With a rule
    that projects (the default :class:`~gmem.compress.energy.ResidualEnergyRule`), each trained matrix's
    coefficients are refitted on the basis by least squares first (:func:`fit_coefficients`: the
    residual is then the part the stored basis does not explain, never larger in Frobenius norm than
    the trained ``E``).
    """
    def matrices(name, layer, entry):
        if getattr(entry, "kind", "dense") != "lowrank-training":
            return None
        g, b = entry.gamma_style, entry.beta_style
        if project:  # the rule measures what the basis cannot explain: refit lam on the trained matrix
            pair = knowledge.pair(name, layer, create=False, shape=shapes[name])
            fits = [fit_coefficients(kb, style.dense().detach()) for kb, style in zip(pair, (g, b))]
            return fits[0], fits[1], entry.bias, rule
        return (g.lam.detach(), g.residual.detach()), (b.lam.detach(), b.residual.detach()), entry.bias, rule

    rule = rank_rule(settings.keep)
    project = bool(getattr(rule, "project", False))
    shapes = {n: shape for n, _, shape in select_layers(G, settings.layers)}

    return _store(G, task, knowledge, settings.layers, matrices)


def compress_dense_task(G, task: str, knowledge: Knowledge, layers=DEFAULT_LAYERS,
                        keep: Union[None, float, RankRule] = None) -> dict:
    """Compress a naive (dense) task into the bases: least-squares coefficients on the current base
    (:func:`fit_coefficients`) and the rank rule (``keep``: a :class:`RankRule`, or the energy rule's
    fraction) on the rest. Returns the per-matrix infos."""
    keep = rank_rule(keep)

    def matrices(name, layer, entry):
        if getattr(entry, "kind", "dense") != "dense":
            return None
        pair = knowledge.pair(name, layer, shape=shapes[name])
        fits = [fit_coefficients(kb, getattr(entry, g).detach().reshape(kb.shape)) for kb, g in zip(pair, GROUPS)]
        return fits[0], fits[1], entry.bias, keep

    shapes = {n: shape for n, _, shape in select_layers(G, layers)}

    info = _store(G, task, knowledge, layers, matrices)
    if not info:
        raise ValueError(f"task {task!r} has no dense style set in the layers {list(layers)} to compress")
    return info


def install_task(G, task: str, state: dict[str, Tensor], knowledge: Knowledge) -> dict[str, Tensor]:
    """Put a stored compressed task's ``"<layer>.lowrank.<group>.<field>"`` tensors into the bases and
    make its entries compressed; returns the rest of ``state`` (for ``load_style_state_dict``).

    The task must already be in ``G``'s banks (dense entries from ``add_task``), and every task stored
    before it in the bases must already be installed. ValueError/KeyError name what does not fit.
    """

    lowrank: dict[str, dict[str, dict[str, Tensor]]] = {}
    rest = {}
    for key, value in state.items():
        if ".lowrank." in key:
            layer, tail = key.split(".lowrank.", 1)
            group, _, field = tail.partition(".")
            if group not in GROUPS or field not in LOWRANK_FIELDS:
                raise ValueError(f"unexpected compressed entry {key!r}")
            lowrank.setdefault(layer, {}).setdefault(group, {})[field] = value
        else:
            rest[key] = value
    if not lowrank:
        return rest

    layers = dict(gnn.modulated_layers(G))
    index = gnn.task_index(G, task)
    with _all_or_nothing(task, index) as (added, plan):
        for name, groups in lowrank.items():
            layer = layers.get(name)
            if not isinstance(layer, (ModulatedConvNd, ModulatedLinear)):
                raise ValueError(f"compressed entry for {name!r}, which is not a modulated layer of this generator")
            for g in GROUPS:
                missing = [x for x in LOWRANK_FIELDS if x not in groups.get(g, {})]
                if missing:
                    raise KeyError(f"{name}.lowrank.{g}: missing {missing}")
            shape = None
            if isinstance(layer, ModulatedLinear):  # the matrix view is the stored columns' [rows, r], [cols, r]
                u, v = groups["gamma"]["u"], groups["gamma"]["v"]
                shape = (u.shape[0], v.shape[0]) if u.ndim == 2 and v.ndim == 2 else None
                if shape is None or shape[0] * shape[1] != layer.out_features:
                    raise ValueError(f"{name}.lowrank.gamma: columns u {tuple(u.shape)}, v {tuple(v.shape)} do not "
                                     f"view the layer's {layer.out_features} outputs as a [rows, cols] matrix")
            pair = knowledge.pair(name, layer, shape=shape)
            for g, kb in zip(GROUPS, pair):
                f = groups[g]
                kb.add_task_factors(task, f["lam"], f["u"], f["s"], f["v"])
                added.append(kb)
            bias = rest.get(f"{name}.bias")
            if bias is None:
                raise KeyError(f"{name}.bias is missing")
            plan.append((layer, CompressedStyle(pair, task, torch.zeros_like(layer.entry(index).bias),
                                                flat=isinstance(layer, ModulatedLinear))))
    return rest
