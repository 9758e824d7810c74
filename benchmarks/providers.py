"""Providers: for one :class:`~benchmarks.cases.Case`, one callable per way of computing it.

* ``reference``: the public gmem op with ``backend="reference"`` (eager PyTorch);
* ``torch_compile``: ``torch.compile`` of the pure functions in :mod:`gmem.ops.reference`
  (mode ``max-autotune`` on GPU, the default mode on CPU; the compile happens before timing and its
  time is recorded as ``compile_s``);
* every compiled backend available here (``gmem.ops.available_backends()``: ``cpu``, ``cuda``,
  ``triton``; an interpreter, i.e. Triton on the CPU, is skipped): the public op with ``backend=name``;
* ``grouped_conv`` (mixed-task convs): per-sample modulated weights and one ``groups=N`` conv,
  as StyleGAN2 does modulated convs;
* ``per_task_plain`` (mixed-task convs): one ``F.conv2d`` per task present, with precomputed
  weights, on inputs already grouped by task: the floor of every group-by-task method (the
  ``reference`` and ``cpu`` mixed paths pay this plus the grouping and the weight builds);
* ``plain``: ``F.conv2d`` / ``F.linear`` with a precomputed weight of the same shape, the limit a
  modulated op can approach (for ``madafm_weight``: a copy of a weight of the output's size, plus
  one window sum of its gradient for ``fwd+bwd``: the memory-traffic floor);
* ``aten`` (``madafm_weight``): the weight build as one ATen op with autograd
  (``torch.addcmul`` of the broadcast styles and ``weight_norm``), called directly: what a call
  costs without gmem's layers, the yardstick of the per-call cost.

Each callable runs the case once: the forward (under ``no_grad`` for ``fwd``), or the forward and
the gradients of the input and every style parameter (``fwd+bwd``, like a training step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import gmem.ops as ops
from gmem.ops import LowRank
from gmem.ops import reference as R

from .cases import Case, task_assignment

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class Provider:
    name: str
    fn: Callable[[], object]
    compile_s: Optional[float] = None
    note: str = ""


@dataclass
class Inputs:
    """Tensors of one case. Style parameters are leaves that need gradients for ``fwd+bwd``."""

    x: Optional[torch.Tensor]
    weight_norm: torch.Tensor
    gamma: object  # Tensor or LowRank
    beta: object
    bias: Optional[torch.Tensor]
    task_ids: Optional[torch.Tensor]
    grad_out: Optional[torch.Tensor]
    leaves: list = field(default_factory=list)  # what fwd+bwd differentiates with respect to
    plain_weight: Optional[torch.Tensor] = None
    plain_bias: Optional[torch.Tensor] = None


def compiled_backends(device: str, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """Names of the compiled backends to run here, and ``{name: why skipped}`` for the others."""
    names, skipped = [], {}
    dev = torch.device(device)
    for name in ops.available_backends():
        if name == "reference":
            continue
        backend = ops.get_backend(name)
        if device == "cpu" and name == "triton":
            skipped[name] = "Triton runs on the CPU only as the interpreter: not a speed measurement"
        elif not backend.auto_eligible(dev):
            skipped[name] = "not eligible on this device (interpreter or emulation)"
        elif not backend.supports(dev, dtype):
            skipped[name] = f"does not support {dev.type} with {dtype}"
        else:
            names.append(name)
    return names, skipped


def _randn(*shape, device, dtype, scale=1.0, grad=False):
    t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    torch.manual_seed(seed)
    dtype = DTYPES[case.dtype]
    layer = case.layer
    bwd = case.pass_ == "fwd+bwd"
    o, i = layer.c_out, layer.c_in
    kw = dict(device=device, dtype=dtype)
    if layer.is_linear:
        weight = _randn(o, i, **kw, scale=i**-0.5)
    else:
        k = layer.kernel
        weight = _randn(o, i, k, k, **kw, scale=(i * k * k) ** -0.5)
    weight_norm, mean, std = ops.normalize_weight(weight)
    style_shape = tuple(mean.shape)  # [O, I] conv, [O] linear
    t = case.style_tasks
    lead = (t,) if t else ()

    def style(base: torch.Tensor) -> object:
        if case.kind == "lowrank":
            # factors of a random rank-r matrix around the source statistics' scale
            r = case.rank
            u = _randn(*lead, o, r, **kw, scale=r**-0.5, grad=bwd)
            s = (torch.rand(*lead, r, device=device) + 0.5).to(dtype).requires_grad_(bwd)
            v = _randn(*lead, i, r, **kw, grad=bwd)
            return LowRank(u, s, v)
        value = base.expand(*lead, *style_shape) + 0.01 * torch.randn(*lead, *style_shape, device=device).to(dtype)
        return value.contiguous().requires_grad_(bwd)

    gamma, beta = style(std), style(mean)
    leaves = []
    for s in (gamma, beta):
        leaves += [s.u, s.s, s.v] if isinstance(s, LowRank) else [s]

    if case.op == "madafm_weight":
        out_shape = (*lead, *weight.shape)
        grad_out = torch.randn(out_shape, device=device).to(dtype) if bwd else None
        return Inputs(None, weight_norm, gamma, beta, None, None, grad_out, leaves,
                      plain_weight=torch.randn(out_shape, device=device).to(dtype).requires_grad_(bwd))

    n = case.batch
    if layer.is_linear:
        x = _randn(n, i, **kw, grad=bwd)
        out_shape = (n, o)
    else:
        x = _randn(n, i, layer.size, layer.size, **kw, grad=bwd)
        out_shape = (n, o, layer.size, layer.size)  # stride 1, "same" padding
    bias_shape = (t, o) if (t and case.kind == "mixed") else (o,)
    bias = _randn(*bias_shape, **kw, scale=0.1, grad=bwd)
    task_ids = None
    if t:
        ids = task_assignment(n, t, case.mix if case.mix != "-" else "uniform")
        task_ids = torch.tensor(ids, device=device, dtype=torch.long)
    grad_out = torch.randn(out_shape, device=device).to(dtype) if bwd else None
    plain_weight = weight.detach().clone().requires_grad_(bwd)
    plain_bias = _randn(o, **kw, scale=0.1, grad=bwd)
    return Inputs(x, weight_norm, gamma, beta, bias, task_ids, grad_out, [x] + leaves + [bias],
                  plain_weight, plain_bias)


# ---------------------------------------------------------------------------------------------
# the forward of each provider (a function of no arguments returning the output)
# ---------------------------------------------------------------------------------------------
def _public_forward(case: Case, inp: Inputs, backend: str) -> Callable[[], torch.Tensor]:
    if case.op == "madafm_weight":
        return lambda: ops.madafm_weight(inp.weight_norm, inp.gamma, inp.beta, backend=backend)
    if case.op == "modulated_linear":
        return lambda: ops.modulated_linear(
            inp.x, inp.weight_norm, inp.gamma, inp.beta, inp.bias, task_ids=inp.task_ids, backend=backend
        )
    pad = case.layer.padding
    return lambda: ops.modulated_conv2d(
        inp.x, inp.weight_norm, inp.gamma, inp.beta, inp.bias, padding=pad, task_ids=inp.task_ids,
        backend=backend,
    )


def _dense(style):
    return style.dense() if isinstance(style, LowRank) else style


def _compiled_forward(case: Case, inp: Inputs, mode: Optional[str]) -> Callable[[], torch.Tensor]:
    """``torch.compile`` of the reference function (low-rank factors densified inside it)."""
    pad = [case.layer.padding] * 2
    bias = inp.bias
    if bias is not None and inp.task_ids is not None and bias.ndim == 1:
        bias = bias.expand(int(inp.gamma.shape[0]), -1)
    lowrank = isinstance(inp.gamma, LowRank)

    def styles(g, b):
        return (LowRank(*g).dense(), LowRank(*b).dense()) if lowrank else (g, b)

    g_arg = (inp.gamma.u, inp.gamma.s, inp.gamma.v) if lowrank else inp.gamma
    b_arg = (inp.beta.u, inp.beta.s, inp.beta.v) if lowrank else inp.beta

    if case.op == "madafm_weight":
        if case.layer.is_linear:
            raise ValueError("benchmarks: madafm_weight cases use conv weights")

        def f(g, b):
            g, b = styles(g, b)
            return R.madafm_weight(inp.weight_norm, g, b)

        compiled = torch.compile(f, mode=mode)
        return lambda: compiled(g_arg, b_arg)
    if case.op == "modulated_linear":
        def f(x, g, b, c, ids):
            g, b = styles(g, b)
            return R.modulated_linear(x, inp.weight_norm, g, b, c, ids)
    else:
        def f(x, g, b, c, ids):
            g, b = styles(g, b)
            return R.modulated_conv2d(x, inp.weight_norm, g, b, c, ids, [1, 1], pad, [1, 1])
    compiled = torch.compile(f, mode=mode)
    return lambda: compiled(inp.x, g_arg, b_arg, bias, inp.task_ids)


def _grouped_forward(case: Case, inp: Inputs) -> Callable[[], torch.Tensor]:
    """Per-sample weights ``[N, O, I, k, k]`` and one grouped conv (StyleGAN2's formulation)."""
    n, i, h, w = inp.x.shape
    o, k, pad = case.layer.c_out, case.layer.kernel, case.layer.padding

    def f():
        g, b = _dense(inp.gamma), _dense(inp.beta)
        weights = R.madafm_weight(inp.weight_norm, g.index_select(0, inp.task_ids), b.index_select(0, inp.task_ids))
        y = F.conv2d(inp.x.reshape(1, n * i, h, w), weights.reshape(n * o, i, k, k), None, 1, pad, 1, n)
        y = y.reshape(n, o, *y.shape[2:])
        bias = inp.bias.index_select(0, inp.task_ids) if inp.bias.ndim == 2 else inp.bias.expand(n, o)
        return y + bias[:, :, None, None]

    return f


def _per_task_plain_step(case: Case, inp: Inputs) -> Callable[[], object]:
    """Per-task convs with precomputed weights on pre-grouped inputs (no gather, no weight build)."""
    pad = case.layer.padding
    bwd = case.pass_ == "fwd+bwd"
    tasks = torch.unique(inp.task_ids).tolist()
    groups = []
    for t in tasks:
        rows = (inp.task_ids == t).nonzero().flatten()
        x = inp.x.detach().index_select(0, rows).requires_grad_(bwd)
        w = inp.plain_weight.detach().clone().requires_grad_(bwd)
        dy = inp.grad_out.index_select(0, rows) if bwd else None
        groups.append((x, w, dy))

    def step():
        if not bwd:
            with torch.no_grad():
                return [F.conv2d(x, w, inp.plain_bias, 1, pad) for x, w, _ in groups]
        outs = [torch.autograd.grad(F.conv2d(x, w, inp.plain_bias, 1, pad), (x, w, inp.plain_bias), dy)
                for x, w, dy in groups]
        return outs

    return step


def _plain_forward(case: Case, inp: Inputs) -> Callable:
    if case.op == "madafm_weight":
        return None  # handled by _plain_weight_step
    if case.op == "modulated_linear":
        return lambda: F.linear(inp.x, inp.plain_weight, inp.plain_bias)
    pad = case.layer.padding
    return lambda: F.conv2d(inp.x, inp.plain_weight, inp.plain_bias, 1, pad)


def _plain_weight_step(case: Case, inp: Inputs) -> Callable[[], object]:
    w = inp.plain_weight
    if case.pass_ == "fwd":
        return lambda: w.detach().clone()

    def step():
        out = w.detach().clone()
        return out, inp.grad_out.sum((-2, -1))

    return step


def _step(case: Case, forward: Callable[[], torch.Tensor], leaves: list, grad_out) -> Callable[[], object]:
    """One run of the case: ``fwd`` under no_grad, or forward + gradients of ``leaves``."""
    if case.pass_ == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return run

    def run():
        out = forward()
        return torch.autograd.grad(out, leaves, grad_out)

    return run


def build_providers(case: Case, inp: Inputs, device: str, names: list[str], compile_mode: Optional[str],
                    include: Optional[set[str]] = None) -> list[Provider]:
    """The providers of ``case`` (restricted to ``include`` if given), compiled ones compiled and run once."""
    wanted = lambda name: include is None or name in include  # noqa: E731
    providers: list[Provider] = []
    if wanted("reference"):
        providers.append(Provider("reference", _step(case, _public_forward(case, inp, "reference"), inp.leaves,
                                                     inp.grad_out)))
    if wanted("torch_compile"):
        torch._dynamo.reset()  # a fresh compile for this case (no recompile limits, no stale graphs)
        fn = _step(case, _compiled_forward(case, inp, compile_mode), inp.leaves, inp.grad_out)
        t0 = time.perf_counter()
        fn()  # compiles the forward (and the backward for fwd+bwd)
        if device == "cuda":
            torch.cuda.synchronize()
        providers.append(Provider("torch_compile", fn, compile_s=time.perf_counter() - t0,
                                  note=f"mode={compile_mode or 'default'}"))
    for name in names:
        if wanted(name):
            providers.append(Provider(name, _step(case, _public_forward(case, inp, name), inp.leaves, inp.grad_out)))
    if case.op == "modulated_conv2d" and inp.task_ids is not None and wanted("grouped_conv"):
        providers.append(Provider("grouped_conv", _step(case, _grouped_forward(case, inp), inp.leaves, inp.grad_out)))
    if case.op == "modulated_conv2d" and inp.task_ids is not None and wanted("per_task_plain"):
        providers.append(Provider("per_task_plain", _per_task_plain_step(case, inp),
                                  note="per-task F.conv2d, precomputed weights, pre-grouped inputs"))
    if case.op == "madafm_weight" and not isinstance(inp.gamma, LowRank) and wanted("aten"):
        wn, g, b = inp.weight_norm, inp.gamma, inp.beta
        providers.append(Provider("aten", _step(case, lambda: torch.addcmul(b[..., None, None], g[..., None, None], wn),
                                                inp.leaves, inp.grad_out), note="one ATen op with autograd"))
    if wanted("plain"):
        if case.op == "madafm_weight":
            providers.append(Provider("plain", _plain_weight_step(case, inp), note="copy + window-sum floor"))
        else:
            leaves = [inp.x, inp.plain_weight, inp.plain_bias]
            providers.append(Provider("plain", _step(case, _plain_forward(case, inp), leaves, inp.grad_out)))
    return providers
