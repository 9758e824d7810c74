"""Backends behind one op definition (bitsandbytes-style).

A backend is an object with the six methods of :class:`Backend`. Each receives canonical,
validated arguments (see :mod:`gmem.ops.reference`) and returns plain tensors; autograd, fake
tensors and torch.compile are handled once, in :mod:`gmem.ops.library`. The base class implements
every method with the pure-PyTorch reference, so a backend overrides only what it accelerates and
the rest always works.

Registering a backend::

    class MyBackend(Backend):
        name = "mine"
        device_types = ("cuda",)
        def is_available(self): ...
        def modulated_conv2d(self, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation): ...

    register_backend(MyBackend(), priority=30)

``backend="auto"`` picks, for the device of the inputs, the available backend with the highest
priority that supports the dtype and passed its self-check (:mod:`gmem.ops.selfcheck`);
``GMEM_BACKEND=name`` in the environment overrides "auto".
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from . import selfcheck as _selfcheck

__all__ = ["Backend", "register_backend", "get_backend", "available_backends", "resolve_backend"]

Grads = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]


class Backend:
    """The interface (and the pure-PyTorch default) of a gmem backend."""

    name: str = "reference"
    #: device types (``torch.device.type``) this backend runs on
    device_types: tuple[str, ...] = ("cpu", "cuda")
    #: dtypes this backend computes in
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    #: whether torch.compile (dynamo) can trace this backend's methods, fullgraph, and should: then
    #: compile sees its kernels instead of one opaque custom op (gmem.ops.library)
    traceable: bool = False
    #: public ops whose backend method records its own autograd (a C++ autograd kernel): eager calls
    #: use the method as it is, with no Python autograd node around it (gmem.ops.library)
    native_autograd: frozenset[str] = frozenset()

    def is_available(self) -> bool:
        return True

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in self.device_types and dtype in self.dtypes

    def auto_eligible(self, device: torch.device) -> bool:
        """Whether ``backend="auto"`` may pick this backend on ``device`` (e.g. never an interpreter)."""
        return True

    # -- weight modulation -------------------------------------------------------------------
    def madafm_weight(self, weight_norm: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """``weight_norm [O, I, kh, kw]``, ``gamma, beta [O, I] | [T, O, I]`` -> ``[(T,) O, I, kh, kw]``."""
        return reference.madafm_weight(weight_norm, gamma, beta)

    def madafm_weight_backward(self, grad_weight: Tensor, weight_norm: Tensor) -> tuple[Tensor, Tensor]:
        """``grad_weight [(T,) O, I, kh, kw]`` -> ``(dgamma, dbeta)``, each ``[(T,) O, I]``."""
        return reference.madafm_weight_backward(grad_weight, weight_norm)

    # -- convolution -------------------------------------------------------------------------
    def modulated_conv2d(
        self, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
        task_ids: Optional[Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    ) -> Tensor:
        return reference.modulated_conv2d(x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation)

    def modulated_conv2d_backward(
        self, grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor,
        bias: Optional[Tensor], task_ids: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
        dilation: Sequence[int], output_mask: Sequence[bool],
    ) -> Grads:
        """``output_mask = (x, gamma, beta, bias)``: which gradients to compute (others may be None)."""
        return reference.modulated_conv2d_backward(
            grad_out, x, weight_norm, gamma, beta, bias, task_ids, stride, padding, dilation, output_mask
        )

    # -- linear (mFiLM) ----------------------------------------------------------------------
    def modulated_linear(
        self, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
        task_ids: Optional[Tensor],
    ) -> Tensor:
        """``x [M, I]``, ``weight_norm [O, I]``, ``gamma, beta [O] | [T, O]`` -> ``[M, O]``."""
        return reference.modulated_linear(x, weight_norm, gamma, beta, bias, task_ids)

    def modulated_linear_forward(
        self, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor, bias: Optional[Tensor],
        task_ids: Optional[Tensor],
    ) -> tuple[Tensor, Optional[Tensor]]:
        """The output and, if the backend can hand it over, ``x_wn = x @ weight_norm^T [M, O]`` for its
        backward (the GEMM every task shares); ``None`` here: the backward recomputes what it needs."""
        return self.modulated_linear(x, weight_norm, gamma, beta, bias, task_ids), None

    def modulated_linear_backward(
        self, grad_out: Tensor, x: Tensor, weight_norm: Tensor, gamma: Tensor, beta: Tensor,
        bias: Optional[Tensor], task_ids: Optional[Tensor], output_mask: Sequence[bool],
        x_wn: Optional[Tensor] = None,
    ) -> Grads:
        """``x_wn``: what :meth:`modulated_linear_forward` returned (a backend may ignore it)."""
        return reference.modulated_linear_backward(grad_out, x, weight_norm, gamma, beta, bias, task_ids, output_mask)

    def __repr__(self) -> str:
        return f"<gmem backend {self.name!r}>"


_REGISTRY: dict[str, tuple[int, Backend]] = {}


def register_backend(backend: Backend, priority: int = 0) -> Backend:
    """Add (or replace) a backend; higher ``priority`` wins under ``backend="auto"``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend: expected a gmem.ops.Backend, got {type(backend).__name__}")
    _REGISTRY[backend.name] = (priority, backend)
    return backend


def _load_optional_backends() -> None:
    # Compiled and Triton backends register themselves on import; a missing build or Triton only
    # makes them unavailable. Imported lazily so `import gmem` stays cheap and never compiles.
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib

    for module in ("gmem.ops._cpp_backend", "gmem.ops._triton_backend"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but something it needs is missing
                import warnings

                warnings.warn(f"gmem: backend module {module} could not load: {err}", stacklevel=2)


_optional_loaded = False


def get_backend(name: str) -> Backend:
    _load_optional_backends()
    try:
        return _REGISTRY[name][1]
    except KeyError:
        raise ValueError(
            f"backend={name!r} is unknown; registered backends: {sorted(_REGISTRY)}"
        ) from None


def available_backends() -> list[str]:
    """Names of the backends usable on this machine (``"reference"`` always), best first."""
    _load_optional_backends()
    ranked = sorted(_REGISTRY.items(), key=lambda kv: -kv[1][0])
    return [name for name, (_, b) in ranked if b.is_available()]


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The concrete backend name for ``backend`` ("auto" or a name) on ``device``/``dtype``."""
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a string, got {type(backend).__name__}")
    return _resolve(backend, device.type, dtype, op)


# Resolution looks at the machine (loads the extension, imports Triton), never at tensor values:
# under torch.compile it runs once at trace time and its answer is a constant of the graph.
@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, dtype: torch.dtype, op: str) -> str:
    device = torch.device(device_type)
    if backend == "auto":
        backend = os.environ.get("GMEM_BACKEND", "auto") or "auto"
    _load_optional_backends()
    if backend == "auto":
        for name, (_, b) in sorted(_REGISTRY.items(), key=lambda kv: -kv[1][0]):
            usable = b.auto_eligible(device) and b.is_available() and b.supports(device, dtype)
            if usable and _trusted(name, device, dtype):
                return name
        return "reference"
    b = get_backend(backend)
    if not b.is_available():
        raise ValueError(
            f"{op}: backend={backend!r} is not available here; available: {available_backends()}"
        )
    if not b.supports(device, dtype):
        raise ValueError(
            f"{op}: backend={backend!r} does not support device {device.type!r} with dtype {dtype}"
            f" (it runs on {list(b.device_types)})"
        )
    return backend


def _trusted(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Trust on first use: a backend passes a tiny check against the reference before "auto" picks it
    (gmem.ops.selfcheck: cached per build, device and dtype; GMEM_SELFCHECK=0 skips it)."""
    return name == "reference" or _selfcheck.trusted(name, device, dtype)


register_backend(Backend(), priority=0)
