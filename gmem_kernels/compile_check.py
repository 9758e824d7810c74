"""Compile every kernel for an NVIDIA GPU target *without a GPU* (Triton's bundled ptxas).

The CPU interpreter executes the kernels' Python, not the compiler, so it cannot catch code that
Triton refuses or miscompiles for a real GPU. This ahead-of-time compile catches the former
(type errors, unsupported constructs, shared-memory overflow for the tuned configurations) on a
machine with no GPU. It cannot check numbers: that needs a GPU run (tests/test_triton.py).

Run: ``TRITON_INTERPRET=0 python -m gmem_kernels.compile_check [--arch 90] [--all-configs]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _jit(kernel):
    """The JITFunction under an autotuner (or the kernel itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _signature(fn, constexprs: dict, pointers: dict[str, str], default_ptr: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, default_ptr)
        else:
            sig[name] = "i32"
    return sig


def _cases(dtype: str):
    """(name, kernel, constexprs, pointer dtypes, configs) for every kernel, with ``dtype`` data."""
    from . import conv, linear, weight

    idx = {"order_ptr": "*i32", "seg_start_ptr": "*i32", "seg_count_ptr": "*i32", "seg_task_ptr": "*i32",
           "tid_ptr": "*i64"}
    fp32_out = {"dg_ptr": "*fp32", "db_ptr": "*fp32", "dc_ptr": "*fp32"}
    gemm = [c.kwargs | {"num_warps": c.num_warps, "num_stages": c.num_stages} for c in conv._gemm_configs()]
    wgrad = [c.kwargs | {"num_warps": c.num_warps, "num_stages": c.num_stages} for c in conv._wgrad_configs()]
    lin = [c.kwargs | {"num_warps": c.num_warps, "num_stages": c.num_stages} for c in linear._configs()]
    prec = "tf32" if dtype == "fp32" else "ieee"
    for lowrank in (False, True):
        yield (f"conv_fwd lowrank={lowrank}", _jit(conv._conv_fwd_kernel),
               dict(KH=3, KW=3, HAS_BIAS=True, HAS_ORDER=True, LOWRANK=lowrank, R_BLOCK=16, S_BLOCK=64,
                    IN_PREC=prec), idx, gemm)
        yield (f"conv_dx lowrank={lowrank}", _jit(conv._conv_dx_kernel),
               dict(KH=3, KW=3, HAS_ORDER=True, LOWRANK=lowrank, R_BLOCK=16, S_BLOCK=64, IN_PREC=prec), idx, gemm)
    yield ("conv_style_grad", _jit(conv._conv_style_grad_kernel),
           dict(KH=3, KW=3, HAS_ORDER=True, SPLIT=4, IN_PREC=prec), idx | fp32_out, wgrad)
    yield ("conv_bias_grad", _jit(conv._conv_bias_grad_kernel),
           dict(HAS_ORDER=True, SPLIT=4, BLOCK_O=64, BLOCK_M=32), idx | fp32_out, [{"num_warps": 4}])
    yield ("linear_fwd", _jit(linear._linear_fwd_kernel), dict(HAS_BIAS=True, HAS_TASKS=True, IN_PREC=prec), idx, lin)
    yield ("linear_dx", _jit(linear._linear_dx_kernel), dict(HAS_TASKS=True, IN_PREC=prec), idx, lin)
    yield ("linear_style_grad", _jit(linear._linear_style_grad_kernel),
           dict(HAS_ORDER=True, SPLIT=4, IN_PREC=prec, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), idx | fp32_out,
           [{"num_warps": 4}])
    yield ("madafm_weight", _jit(weight._madafm_weight_kernel), dict(BLOCK_R=32, BLOCK_K=128), {}, [{"num_warps": 4}])
    yield ("madafm_weight_backward", _jit(weight._madafm_weight_backward_kernel), dict(BLOCK_R=64, BLOCK_K=64), {},
           [{"num_warps": 4}])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--all-configs", action="store_true", help="every autotune configuration, not the first")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (it must be 0 to compile)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype in args.dtypes.split(","):
        for name, fn, constexprs, pointers, configs in _cases(dtype):
            for config in configs if args.all_configs else configs[:1]:
                meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
                consts = constexprs | meta
                opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
                start = time.perf_counter()
                try:
                    src = ASTSource(fn, _signature(fn, consts, pointers, f"*{dtype}"), constexprs=consts)
                    compiled = triton.compile(src, target=target, options=opts)
                    smem = compiled.metadata.shared
                    print(f"ok    {dtype:5s} {name:28s} {meta} smem={smem} ({time.perf_counter() - start:.1f}s)")
                except Exception as err:  # report every failure, then fail
                    failures += 1
                    print(f"FAIL  {dtype:5s} {name:28s} {meta}: {type(err).__name__}: {str(err)[:400]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
