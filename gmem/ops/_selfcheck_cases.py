"""The cases of the backend self-check (:mod:`gmem.ops.selfcheck`): tiny ops, forward and every
gradient, on one backend against the reference in float64, with one tolerance per dtype."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["CASES", "CaseResult", "TOLERANCES", "TF32_TOLERANCE", "run_cases", "tolerance"]

#: largest error allowed, relative to the largest magnitude of the float64 reference output
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
#: float32 on a GPU where torch allows TF32 (10-bit mantissa): cuDNN convolutions, Triton's tl.dot
TF32_TOLERANCE = 5e-3


def _tf32_allowed() -> bool:
    """Whether torch lets float32 convolutions or matmuls on a GPU use TF32 (cuDNN does by default)."""
    for backend in (torch.backends.cudnn, torch.backends.cuda.matmul):
        precision = getattr(backend, "fp32_precision", "none")
        if precision in ("tf32", "ieee"):
            if precision == "tf32":
                return True
            continue
        try:  # the legacy flag; reading it raises in recent torch once the new API was used
            if backend.allow_tf32:
                return True
        except RuntimeError:
            pass
    return False


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The error bound of :func:`run_cases` for ``dtype`` on ``device`` (see :data:`TOLERANCES`)."""
    if dtype == torch.float32 and device.type == "cuda" and _tf32_allowed():
        return TF32_TOLERANCE
    return TOLERANCES[dtype]


# ---------------------------------------------------------------------------------------------
# The cases: tiny ops in float64 on the CPU's generator, cast to the dtype under test
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    """One case of one backend: the error of each output and gradient, or the exception raised."""

    case: str
    errors: dict = field(default_factory=dict)  # output name -> max |got - want| / max |want|
    tol: float = 0.0
    error: Optional[str] = None  # an exception or a shape mismatch

    @property
    def ok(self) -> bool:
        return self.error is None and all(e <= self.tol for e in self.errors.values())

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=float("nan"))

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.case}: {self.error}"
        name, worst = max(self.errors.items(), key=lambda kv: kv[1])
        return f"{self.case}: {name} error {worst:.2e} (tolerance {self.tol:.0e})"


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)


def _case_conv(mixed: bool, lowrank: bool):
    def build(seed):
        r = _inputs(seed)
        x = r(5 if mixed else 2, 3, 5, 6)
        from .reference import normalize_weight

        wn = normalize_weight(r(4, 3, 3, 3))[0]
        lead = (4,) if mixed else ()  # 4 tasks, task 2 absent from the batch: its gradients must be 0
        if lowrank:
            styles = [r(*lead, 4, 2), r(*lead, 2).abs() + 0.5, r(*lead, 3, 2),
                      r(*lead, 4, 2), r(*lead, 2), r(*lead, 3, 2)]
        else:
            styles = [r(*lead, 4, 3) + 1.0, r(*lead, 4, 3)]
        bias = r(*lead, 4)
        ids = torch.tensor([3, 0, 3, 1, 0]) if mixed else None
        return dict(leaves=[x, *styles, bias], fixed=[wn], ids=ids)

    def call(ops, backend, x, *rest, wn, ids):
        *styles, bias = rest
        if lowrank:
            from .lowrank import LowRank

            gamma, beta = LowRank(*styles[:3]), LowRank(*styles[3:])
        else:
            gamma, beta = styles
        conv = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)) if mixed else dict(padding=1)
        return ops.modulated_conv2d(x, wn, gamma, beta, bias, task_ids=ids, backend=backend, **conv)

    names = ["x", *(["gamma.u", "gamma.s", "gamma.v", "beta.u", "beta.s", "beta.v"] if lowrank else ["gamma", "beta"]),
             "bias"]
    return build, call, names


def _case_linear(mixed: bool):
    def build(seed):
        r = _inputs(seed)
        from .reference import normalize_weight

        x, wn = r(4, 6), normalize_weight(r(5, 6))[0]
        lead = (4,) if mixed else ()
        ids = torch.tensor([1, 3, 0, 1]) if mixed else None
        return dict(leaves=[x, r(*lead, 5) + 1.0, r(*lead, 5), r(*lead, 5)], fixed=[wn], ids=ids)

    def call(ops, backend, x, gamma, beta, bias, wn, ids):
        return ops.modulated_linear(x, wn, gamma, beta, bias, task_ids=ids, backend=backend)

    return build, call, ["x", "gamma", "beta", "bias"]


def _case_weight():
    def build(seed):
        r = _inputs(seed)
        from .reference import normalize_weight

        wn = normalize_weight(r(4, 3, 3, 3))[0]
        return dict(leaves=[r(2, 4, 3) + 1.0, r(2, 4, 3)], fixed=[wn], ids=None)

    def call(ops, backend, gamma, beta, wn, ids):
        return ops.madafm_weight(wn, gamma, beta, backend=backend)

    return build, call, ["gamma", "beta"]


#: name -> (build(seed), call(ops, backend, *leaves, wn=..., ids=...), leaf names)
CASES: dict[str, tuple] = {
    "conv single task": _case_conv(mixed=False, lowrank=False),
    "conv mixed tasks": _case_conv(mixed=True, lowrank=False),
    "conv low rank mixed tasks": _case_conv(mixed=True, lowrank=True),
    "linear single task": _case_linear(mixed=False),
    "linear mixed tasks": _case_linear(mixed=True),
    "weight mixed tasks": _case_weight(),
}


def _relative_error(got: Tensor, want: Tensor) -> float:
    if got is None or tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"shape {None if got is None else tuple(got.shape)}, expected {tuple(want.shape)}")
    got = got.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max().item() if want.numel() else 1.0
    return (got - want).abs().max().item() / max(scale, 1e-12) if want.numel() else 0.0


def _run(ops, backend: str, case, device, dtype, seed: int):
    """``{"out": y, "d<leaf>": grad, ...}`` of one case on one backend, in ``dtype`` on ``device``."""
    build, call, names = case
    data = build(seed)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in data["leaves"]]
    wn = data["fixed"][0].to(device=device, dtype=dtype)
    ids = None if data["ids"] is None else data["ids"].to(device)
    # the backend chosen as a context too: the check may run while torch.compile traces a call
    # (resolving "auto"), where an op's backend= keyword alone cannot set it (gmem.ops.backends)
    with ops.use_backend(backend):
        out = call(ops, backend, *leaves, wn=wn, ids=ids)
    grad_out = _inputs(seed + 1)(*out.shape).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return {"out": out, **{f"d {n}": g for n, g in zip(names, grads)}}


def run_cases(backend: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
              cases: Optional[dict] = None) -> list[CaseResult]:
    """Each case of :data:`CASES` on ``backend`` vs the reference in float64 on ``device``.

    Runs eagerly, with gradients on and autocast off whatever the caller's context, and draws its
    inputs from its own generator (the global RNG is untouched).
    """
    from .. import ops

    device = torch.device(device)
    tol = tolerance(dtype, device)
    results = []
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for name, case in (cases or CASES).items():
            result = CaseResult(name, tol=tol)
            try:
                want = _run(ops, "reference", case, device, torch.float64, seed)
                got = _run(ops, backend, case, device, dtype, seed)
                for key, ref in want.items():
                    result.errors[key] = _relative_error(got[key], ref.detach())
            except Exception as err:  # a backend that raises on a valid tiny case fails the case
                result.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            results.append(result)
    return results
