"""The ``torch.nn`` layer types gmem modulates and the modulated class of each: the one table
:func:`gmem.nn.convert` reads. Exact types only (a subclass may compute something else)."""
from __future__ import annotations

from torch import nn

from .conv import (
    ModulatedConv1d,
    ModulatedConv2d,
    ModulatedConv3d,
    ModulatedConvTranspose1d,
    ModulatedConvTranspose2d,
    ModulatedConvTranspose3d,
)
from .layers import ModulatedLayer, ModulatedLinear

__all__ = ["MODULATED_LAYERS"]

#: ``torch.nn`` type -> modulated class (each class has ``plain_module(weight, bias)`` for the way back)
MODULATED_LAYERS: dict[type[nn.Module], type[ModulatedLayer]] = {
    nn.Linear: ModulatedLinear,
    nn.Conv1d: ModulatedConv1d,
    nn.Conv2d: ModulatedConv2d,
    nn.Conv3d: ModulatedConv3d,
    nn.ConvTranspose1d: ModulatedConvTranspose1d,
    nn.ConvTranspose2d: ModulatedConvTranspose2d,
    nn.ConvTranspose3d: ModulatedConvTranspose3d,
}
