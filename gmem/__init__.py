"""gmem: GAN memory with no forgetting (Cong, Zhao et al., NeurIPS 2020) as software.

Layers (nothing lower imports anything higher; ``docs/design.md`` section 5, checked by ``make lint``):
:mod:`gmem.ops` (modulated ops and backends) <- :mod:`gmem.nn` (modulated layers, convert, task
selection), :mod:`gmem.models` (GP-GAN), :mod:`gmem.store` (the memory directory) <- :mod:`gmem.training`
<- :mod:`gmem.compress`, :mod:`gmem.baselines` <- :mod:`gmem.memory` (:class:`GANMemory`) <-
:mod:`gmem.experiments` <- :mod:`gmem.cli`.
"""
__version__ = "0.1.0"

# gmem.ops is imported eagerly (a public attribute; its import registers the backends): a re-export
from . import ops as ops


def __getattr__(name):
    # The memory system pulls in models and training code: import it only when asked for.
    if name == "GANMemory":
        from .memory import GANMemory

        return GANMemory
    if name in ("nn", "models", "memory", "compress", "eval", "data", "cli"):
        import importlib

        return importlib.import_module(f"gmem.{name}")
    raise AttributeError(f"module 'gmem' has no attribute {name!r}")
