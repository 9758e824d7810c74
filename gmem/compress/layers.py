"""Which generator layers a compressed task stores in the knowledge bases, and as which matrices.

A layer selection is a sequence whose items are glob strings over generator layer names (e.g.
``"resnet_0_0.conv_*"``, ``"fc"``) or pairs ``(glob, (rows, cols))`` that give a linear layer's matrix view
explicitly. Each selected layer contributes two style matrices (``Gamma`` and ``B``):

- a modulated conv ``[O, I]``: its ``gamma``, ``beta [O, I]`` as they are;
- a modulated linear (mFiLM): its per-output vectors ``gamma``, ``beta [d_out]`` viewed as a
  ``[rows, cols]`` matrix (row-major, ``rows * cols = d_out``). A GP-GAN generator's ``fc`` output is
  reshaped to ``(16 nf, s0, s0)`` by the generator, so its natural view is ``(16 nf, s0 * s0)``: one row per
  channel of the first feature map, one column per position. That view is used for a layer named ``fc``
  of a generator with ``nf``/``s0`` whose fc has ``16 nf s0^2`` outputs; any other linear layer needs an
  explicit ``(rows, cols)`` (ValueError otherwise: the view is never guessed).

The linear layer's bias delta ``b_fc`` stays dense: it starts at zero for every task (so the base
cannot explain any of it), and a conditional task keeps one row per class.
"""
from __future__ import annotations

from typing import Optional

from .. import nn as gnn
from ..nn.conv import ModulatedConvNd
from ..nn.layers import ModulatedLinear
from ..nn.tasks import _matcher

__all__ = ["parse_layers", "normalise_layers", "select_layers", "gpgan_fc_shape", "FC_LAYER"]

#: The GP-GAN generator's first (linear) layer.
FC_LAYER = "fc"


def _check_shape(shape, what: str) -> tuple[int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise ValueError(f"{what}: a matrix view must be (rows, cols) of positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


def parse_layers(layers) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """``(globs, {glob: (rows, cols)})`` of a layer selection (a str, or a sequence of str / (glob, shape))."""
    items = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, (list, tuple)) else None
    if not items:
        raise ValueError(f"compression layers must be glob strings or (glob, (rows, cols)) pairs, got {layers!r}")
    globs, shapes = [], {}
    for item in items:
        if isinstance(item, str):
            globs.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            globs.append(item[0])
            shapes[item[0]] = _check_shape(item[1], f"compression layer {item[0]!r}")
        else:
            raise ValueError(f"compression layers: {item!r} is neither a glob string nor a (glob, (rows, cols)) pair")
    return globs, shapes


def normalise_layers(layers) -> tuple:
    """The selection as a tuple of str and ``(glob, (rows, cols))`` (checked)."""
    globs, shapes = parse_layers(layers)
    return tuple((g, shapes[g]) if g in shapes else g for g in globs)


def gpgan_fc_shape(G, name: str, layer) -> Optional[tuple[int, int]]:
    """``(16 nf, s0^2)`` when ``layer`` is a GP-GAN generator's ``fc`` (the output is viewed as
    ``(16 nf, s0, s0)``), else None."""
    nf, s0 = getattr(G, "nf", None), getattr(G, "s0", None)
    if name != FC_LAYER or not isinstance(nf, int) or not isinstance(s0, int):
        return None
    rows, cols = 16 * nf, s0 * s0
    return (rows, cols) if rows * cols == layer.out_features else None


def select_layers(G, layers) -> list:
    """``[(name, layer, (rows, cols))]``: the modulated convs and linear layers of ``G`` that ``layers`` selects.

    ValueError if nothing is selected, if a linear layer has no matrix view (neither the GP-GAN fc nor an
    explicit shape), or if an explicit shape does not fit (``rows * cols != d_out``, or given for a conv).
    """

    globs, shapes = parse_layers(layers)
    match = _matcher(globs, "compression layers")
    out = []
    for name, m in gnn.modulated_layers(G):
        if not match(name):
            continue
        own = [shapes[g] for g in shapes if _matcher([g], "compression layers")(name)]
        if isinstance(m, ModulatedConvNd):
            rows, cols = m.weight_std.shape  # [C_out, C_in/groups] (transposed: [C_in, C_out/groups])
            if own:
                raise ValueError(f"compression layer {name!r} is a conv: its matrices are [{rows}, {cols}]; "
                                 "a (rows, cols) view applies to linear layers")
            out.append((name, m, (rows, cols)))
        elif isinstance(m, ModulatedLinear):
            shape = own[0] if own else gpgan_fc_shape(G, name, m)
            if shape is None:
                raise ValueError(f"compression layer {name!r} is a linear layer with {m.out_features} outputs and no "
                                 f"matrix view: select it as ({name!r}, (rows, cols)) with rows * cols = "
                                 f"{m.out_features}")
            if shape[0] * shape[1] != m.out_features:
                raise ValueError(f"compression layer {name!r}: the view {shape} has {shape[0] * shape[1]} values, "
                                 f"the layer has {m.out_features} outputs")
            out.append((name, m, shape))
    if not out:
        names = [n for n, _ in gnn.modulated_layers(G)]
        raise ValueError(f"compression layers {list(layers) if not isinstance(layers, str) else [layers]} select no "
                         f"modulated layer; the generator's are {names}")
    return out
