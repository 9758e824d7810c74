"""Sample-quality metrics by name, so that a better one plugs into the experiments without code changes.

A metric is ``fn(real [N, C, H, W], fake [M, C, H, W]) -> float`` (images in [-1, 1], lower is better
unless registered with ``higher_is_better=True``). Built in: ``"pixfid8"`` (:func:`gmem.eval.pixel_fid`,
a cheap pixel-statistics PROXY, not the Inception FID) and ``"fid"`` (:func:`gmem.eval.inception_fid`,
needs local Inception weights). Any other name ``"x"`` is looked up as a function ``gmem.eval.x`` of the
same signature (so metrics added to :mod:`gmem.eval` later are found), or :func:`register` one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .. import eval as geval

__all__ = ["Metric", "register", "get_metric", "available"]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable
    label: str                      # how tables and plots name it
    higher_is_better: bool = False

    def __call__(self, real, fake) -> float:
        return float(self.fn(real, fake))


_REGISTRY: dict[str, Metric] = {}


def register(name: str, fn: Callable, label: str | None = None, higher_is_better: bool = False) -> Metric:
    """Make ``fn(real, fake) -> float`` available as metric ``name`` (replacing one of that name)."""
    if not isinstance(name, str) or not name or not callable(fn):
        raise TypeError("register(name: str, fn: callable)")
    _REGISTRY[name] = Metric(name, fn, label or name, higher_is_better)
    return _REGISTRY[name]


def _builtin(name: str):

    return getattr(geval, name)


register("pixfid8", lambda r, f: _builtin("pixel_fid")(r, f), "pixFID8 (pixel proxy, not FID)")
register("fid", lambda r, f: _builtin("inception_fid")(r, f), "FID (Inception)")


def get_metric(name: str) -> Metric:
    """The metric called ``name`` (registered, or a function of that name in :mod:`gmem.eval`)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    module = importlib.import_module("gmem.eval")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise KeyError(f"unknown metric {name!r}; available: {available()} or a function of gmem.eval")
    return register(name, fn)


def available() -> list[str]:
    return sorted(_REGISTRY)
