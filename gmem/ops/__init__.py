"""gmem.ops: the modulated ops of GAN memory, one definition, several backends.

* :func:`normalize_weight` splits a frozen weight into ``weight_norm, mean, std``.
* :func:`madafm_weight`, :func:`modulated_conv2d` (mAdaFM) and :func:`modulated_linear` (mFiLM) take
  one style set, or a stack ``[T, ...]`` with ``task_ids`` choosing each sample's, dense or
  :class:`LowRank`.
* :func:`modulated_conv`: mAdaFM for every convolution kind (1-3 D, grouped, transposed).
* :func:`available_backends` lists what runs here; ``backend="auto"`` picks the best for the device;
  :func:`use_backend` chooses one for the ops called inside it (``GMEM_BACKEND`` for a whole run).

The ops are ``torch.ops.gmem.*`` (:mod:`gmem.ops._ops`: one schema each, no backend argument).

:mod:`gmem.ops.reference` holds the pure-PyTorch definition every backend is tested against.
"""
from .backends import Backend, available_backends, current_backend, get_backend, register_backend, use_backend
from .convolution import modulated_conv
from .functional import madafm_weight, modulated_conv2d, modulated_linear, normalize_weight, values_known
from .lowrank import LowRank

__all__ = [
    "Backend",
    "LowRank",
    "available_backends",
    "current_backend",
    "get_backend",
    "madafm_weight",
    "modulated_conv",
    "modulated_conv2d",
    "modulated_linear",
    "normalize_weight",
    "register_backend",
    "use_backend",
    "values_known",
]

# The compiled and Triton backends register themselves here, at import, so that the first op
# call may happen inside torch.compile. Their modules are cheap to import: the extension is loaded
# (or JIT-built) and Triton imported only when a backend is first asked whether it is available.
from .backends import _load_optional_backends  # noqa: E402

_load_optional_backends()
