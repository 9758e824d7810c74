"""Trace every kernel op through torch.compile *without a GPU* and report what the graphs contain.

Under the interpreter (``TRITON_INTERPRET=1``) torch cannot trace Triton kernels (its
``wrap_triton`` hands interpreted kernels back unwrapped), so the ``gmem::triton_`` ops stay opaque
there. This check imports the kernels compiled-mode (``TRITON_INTERPRET=0``, as on a GPU) and runs
dynamo and AOT autograd on CPU tensors up to the point where the kernels would run, then stops:

* the dynamo graph must hold the ``gmem::triton_`` ops (one graph: ``fullgraph=True``);
* the AOT graph must hold ``triton_kernel_wrapper_functional`` nodes (the kernel launches, which
  inductor can schedule) and no ``gmem::triton_`` op left undecomposed;
* ``triton_op`` must have found the one kernel each op launches (read from the op's source).

Without a GPU Triton has no driver, so torch's analysis of which arguments a kernel writes fails
and it assumes every tensor argument is written (a warning, silenced here); on a GPU the analysis
works. Numbers are not checked here: that needs a GPU, or the interpreter (tests/test_triton.py).

Run: ``TRITON_INTERPRET=0 python -m gmem_kernels.trace_check`` (prints one line per graph, exit 0
when both graphs have the expected nodes).
"""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter


class _Stop(Exception):
    """Raised by the capturing backend once the AOT graph is seen (nothing runs: no GPU)."""


def _is_launch_op(name: str) -> bool:
    """A Triton launch op of gmem_kernels (``gmem::triton_*``), not a triton kernel HOP."""
    return "gmem" in name and "triton_" in name


def _targets(gm) -> Counter:
    """How often each function is called in ``gm`` (ops and HOPs by their ``name()``)."""
    names = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "name", None)
            names[name() if callable(name) else str(node.target)] += 1
    return names


def _program():
    """A function calling every kernel op: conv (dense and low-rank, mixed tasks), linear, weight."""
    import torch

    import gmem_kernels as k

    def program(x, wn, g, b, c, tid, u, s, v, xl, wl, gl, bl, cl, tl_ids):
        groups = k.group_by_task(tid, g.shape[0])
        y = k.conv2d_forward(x, wn, g, b, c, groups, [1, 1], [1, 1], [1, 1])
        dx, dg, db, dc = k.conv2d_backward(y, x, wn, g, b, c, groups, [1, 1], [1, 1], [1, 1], [True] * 4)
        lr = (u, s, v)
        y_lr = k.conv2d_lowrank_forward(x, wn, lr, lr, c, groups, [1, 1], [1, 1], [1, 1])
        dx_lr, d_lr, _, _ = k.conv2d_lowrank_backward(
            y_lr, x, wn, lr, lr, c, groups, [1, 1], [1, 1], [1, 1], [True, True, False, False]
        )
        lgroups = k.group_by_task(tl_ids, gl.shape[0])
        z = k.linear_forward(xl, wl, gl, bl, cl, tl_ids)
        dz = k.linear_backward(z, xl, wl, gl, bl, cl, tl_ids, lgroups, [True] * 4)
        w = k.madafm_weight(wn, g, b)
        dw = k.madafm_weight_backward(w, wn)
        return (y, dx, dg, db, dc, y_lr, dx_lr, *d_lr, z, *dz, w, *dw)

    t, n, i, o, r = 3, 4, 5, 6, 2
    args = (
        torch.randn(n, i, 5, 5), torch.randn(o, i, 3, 3), torch.randn(t, o, i), torch.randn(t, o, i),
        torch.randn(t, o), torch.tensor([2, 0, 2, 1]),
        torch.randn(t, o, r), torch.randn(t, r), torch.randn(t, i, r),
        torch.randn(n, i), torch.randn(o, i), torch.randn(t, o), torch.randn(t, o), torch.randn(t, o),
        torch.tensor([1, 1, 0, 2]),
    )
    return program, args


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("trace_check: unset TRITON_INTERPRET (interpreted kernels cannot be traced)", file=sys.stderr)
        return 2
    import torch
    from torch._dynamo.backends.common import aot_autograd

    # no driver without a GPU: torch's mutation analysis fails and says so (with a traceback) once
    # per kernel; drop exactly that message
    logging.getLogger("torch._dynamo").addFilter(
        lambda record: "identify_accessed_tensors" not in record.getMessage()
    )
    graphs = {}

    def backend(gm, example_inputs):
        graphs["dynamo"] = _targets(gm)

        def forward_compiler(aot_gm, aot_inputs):
            graphs["aot"] = _targets(aot_gm)
            raise _Stop

        return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)

    program, args = _program()
    try:
        torch.compile(program, fullgraph=True, backend=backend)(*args)
    except Exception as err:  # _Stop arrives wrapped by dynamo
        if "_Stop" not in repr(err) and not isinstance(err.__cause__, _Stop):
            raise
    dynamo = {name: c for name, c in graphs.get("dynamo", {}).items() if _is_launch_op(name)}
    aot = graphs.get("aot", Counter())
    launches = sum(c for name, c in aot.items() if "triton_kernel_wrapper" in name)
    left = {name: c for name, c in aot.items() if _is_launch_op(name)}
    # what triton_op found in each op's source (inductor uses it): exactly one kernel per op
    from torch._library.triton import get_triton_kernels_for_op

    found = {name: len(get_triton_kernels_for_op(name)) for name in dynamo}
    print(f"dynamo graph: triton launch ops {dict(sorted(dynamo.items()))}")
    print(f"aot graph: triton kernel launches {launches}, triton launch ops left {left}")
    print(f"kernels registered per op: {found}")
    ok = dynamo and launches and not left and all(n == 1 for n in found.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
