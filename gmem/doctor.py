"""``gmem doctor`` (also ``python -m gmem.doctor``): what gmem runs on here, and whether it is right.

Prints the versions (Python, torch, Triton, CUDA), the compiled extension (which library, its hash,
the ops and the device kernels it holds, the GPU architectures its CUDA code targets, the flags it is
built with), every backend's availability (with the reason when it is unavailable), which kernel
runs each layer kind of ``gmem.nn`` (a compiled one or the reference), a self-test of each
available backend against the float64 reference (:mod:`gmem.ops.selfcheck`: single task, mixed
tasks, low rank; forward and backward; every dtype the backend supports on each device here) and one
timing line per backend. The verdicts are written to the self-check cache, so ``backend="auto"`` in
later processes trusts (or avoids) each backend without checking again.

Exit status: 0 when every available backend passes, 1 otherwise. Under ``TRITON_INTERPRET=1`` the
Triton backend is tested on the CPU (tiny shapes, the interpreter: correct but slow).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

DESCRIPTION = "versions, build, backends and a self-test of each backend against the reference"
ENV_VARS = ("GMEM_BACKEND", "GMEM_SELFCHECK", "GMEM_CACHE_DIR", "GMEM_NO_JIT", "GMEM_EXT_CACHE", "TRITON_INTERPRET",
            "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_VISIBLE_DEVICES")


def _version(package: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    import torch

    from .ops import selfcheck

    info = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy"),
        "gmem": str(Path(__file__).resolve().parent), "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "cuda_available": torch.cuda.is_available(), "gpus": [],
    }
    if torch.cuda.is_available():
        info["driver"] = selfcheck.cuda_driver_version()
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            info["gpus"].append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}"})
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
        info["cpu_features"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    except OSError:
        pass
    info["cpu"] = selfcheck.device_description(torch.device("cpu"))["name"]
    return info


def extension() -> dict:
    """The compiled extension: how it was loaded, the library file, its ops and device code, flags."""

    from .hashing import cached_file_digest
    from .ops import _cpp_backend, _ext_build, _ops, selfcheck

    info = {"loaded": _cpp_backend.extension_loaded(), "how": _cpp_backend.load_method(),
            "error": _cpp_backend.load_error(), "cxx_flags": _ext_build.CXX_FLAGS, "nvcc_flags": _ext_build.NVCC_FLAGS,
            "default_cuda_archs": _ext_build.DEFAULT_CUDA_ARCH_LIST}
    if not info["loaded"]:
        return info
    lib = selfcheck.extension_path()
    if lib is not None and lib.exists():
        stat = lib.stat()
        info["path"] = str(lib)
        info["size_bytes"] = stat.st_size
        info["mtime"] = datetime.datetime.fromtimestamp(stat.st_mtime).isoformat(timespec="seconds")
        info["sha256"] = cached_file_digest(lib)
        data = lib.read_bytes()
        # nvcc keeps each cubin's ptxas command line ("-arch sm_90 ...") in the fatbin
        archs = re.findall(rb"-arch (sm_\d+a?) ", data)
        info["cubins"] = {a.decode(): archs.count(a) for a in sorted(set(archs))}
        info["ptx"] = sorted({m.decode() for m in re.findall(rb"\.target (sm_\d+a?)", data)})
    # the kernels each gmem:: op has of its own per dispatch key (the compiled ones: CPU, CUDA)
    info["ops"] = {n.split("::", 1)[1]: [k for k in ("CPU", "CUDA", "Autograd", "CompositeExplicitAutograd")
                                         if _ops.kernel_for(n.split("::", 1)[1], k)] for n in _ops.op_names()}
    return info


def _why_unavailable(name: str) -> str:
    import torch

    if name in ("cpu", "cuda"):
        from .ops import _cpp_backend

        if not _cpp_backend.extension_loaded():
            return f"the compiled extension did not load: {_cpp_backend.load_error()}"
        if name == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA GPU visible to torch" + ("" if torch.version.cuda else " (a CPU-only torch build)")
            return "the extension was built without CUDA kernels (no nvcc or a CPU torch at build time)"
    if name == "triton":
        from .ops import _triton_backend

        return str(_triton_backend.import_error())
    return "is_available() returned False"


def backends() -> list[dict]:
    """Every registered backend: availability (or why not), the dtypes tested per device, where "auto" may pick it."""
    import torch

    # half precision is checked on GPUs only: on the CPU it is the reference's slow fallback, and
    # Triton's interpreter (numpy) has no bfloat16
    _DTYPES = {"cpu": (torch.float32, torch.float64),
               "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}

    from .ops.backends import registered_backends

    rows = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name, priority, backend in registered_backends():
        available = backend.is_available()
        row = {"name": name, "priority": priority, "available": available,
               "dtypes": {d.type: [str(t).replace("torch.", "") for t in _DTYPES[d.type] if backend.supports(d, t)]
                          for d in devices if available},
               "auto": [d.type for d in devices if available and backend.auto_eligible(d)]}
        if not available:
            row["reason"] = _why_unavailable(name)
        rows.append(row)
    return rows


def layer_kinds() -> list[dict]:
    """For each layer kind ``gmem.nn`` modulates and each device here: the op it runs and whether
    ``backend="auto"`` runs that op with a compiled kernel or the pure-PyTorch reference."""
    import torch
    from torch import nn

    from .nn import MODULATED_LAYERS
    from .ops import _ops
    from .ops.backends import Backend, get_backend, resolve_backend

    kinds = []
    for base_type in MODULATED_LAYERS:
        name = base_type.__name__
        if base_type is nn.Linear:
            kinds.append((name, "modulated_linear"))
        elif base_type is nn.Conv2d:
            kinds += [(f"{name} (groups=1)", "modulated_conv2d"), (f"{name} (grouped, depthwise)", "modulated_conv")]
        else:
            kinds.append((name, "modulated_conv"))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    with warnings.catch_warnings():
        # a backend failing its self-check is reported by the self-test; "auto"'s warning would repeat it
        warnings.simplefilter("ignore", RuntimeWarning)
        chosen = {d.type: resolve_backend("auto", d, torch.float32, "doctor") for d in devices}
    for kind, op in kinds:
        # gmem::modulated_conv is composite: its own kernel is the weight build, the convolution is PyTorch's
        kernel_op = "madafm_weight" if op == "modulated_conv" else op
        for device in devices:
            name = chosen[device.type]
            backend = get_backend(name)
            if isinstance(backend, _ops.DeviceKernels):
                compiled = _ops.kernel_for(kernel_op, device.type.upper())
            else:
                compiled = getattr(type(backend), kernel_op) is not getattr(Backend, kernel_op)
            runs = f"{name} backend, compiled gmem::{kernel_op}" if compiled else "reference (pure PyTorch)"
            if op == "modulated_conv":
                runs += " + PyTorch's convolution"
            rows.append({"kind": kind, "op": f"gmem::{op}", "device": device.type, "backend": name,
                         "compiled": compiled, "runs": runs})
    return rows


def self_test(rows: list[dict]) -> list[dict]:
    """Every available backend, device and dtype against the float64 reference (caching the verdicts)."""
    import torch

    from .ops import selfcheck

    checks = []
    for row in rows:
        if not row["available"]:
            continue
        for device_type, dtypes in row["dtypes"].items():
            device = torch.device(device_type, 0) if device_type == "cuda" else torch.device(device_type)
            for dtype in dtypes:
                if row["name"] == "reference" and dtype == "float64":
                    continue  # the oracle itself
                verdict = selfcheck.check(row["name"], device, getattr(torch, dtype), use_cache=False)
                checks.append({"backend": row["name"], "device": device_type, "dtype": dtype, "ok": verdict.ok,
                               "failed": verdict.failed, "seconds": verdict.seconds, "cases": verdict.results})
    return checks


def timing(rows: list[dict], reps: int = 5) -> list[dict]:
    """One fwd+bwd of a small mixed-task conv per backend (median of ``reps``), float32."""
    import torch

    import gmem.ops as ops

    lines = []
    for row in rows:
        for device_type, dtypes in row.get("dtypes", {}).items():
            if "float32" not in dtypes:
                continue
            interpreted = row["name"] == "triton" and device_type == "cpu"
            n, c, hw, t = (2, 4, 6, 2) if interpreted else (8, 16, 16, 4)
            gen = torch.Generator().manual_seed(0)
            # defaults bind this iteration's generator and device (the closures run within the iteration)
            make = lambda *s, gen=gen, dev=device_type: torch.randn(*s, generator=gen).to(dev)  # noqa: E731
            x, wn = make(n, c, hw, hw).requires_grad_(), ops.normalize_weight(make(c, c, 3, 3))[0]
            g, b = make(t, c, c).requires_grad_(), make(t, c, c).requires_grad_()
            ids = (torch.arange(n) % t).to(device_type)

            def step(x=x, wn=wn, g=g, b=b, ids=ids, backend=row["name"]):
                y = ops.modulated_conv2d(x, wn, g, b, task_ids=ids, padding=1, backend=backend)
                torch.autograd.grad(y.square().sum(), (x, g, b))

            times = []
            try:
                for _ in range(1 if interpreted else reps + 1):
                    if device_type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    step()
                    if device_type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            except Exception as err:  # reported, and already a failure of the self-test
                lines.append({"backend": row["name"], "device": device_type, "error": f"{type(err).__name__}: {err}"})
                continue
            times = times if interpreted else times[1:]  # the first call warms up
            lines.append({"backend": row["name"], "device": device_type, "ms": sorted(times)[len(times) // 2] * 1e3,
                          "shape": f"conv 3x3 {c}->{c}, x [{n}, {c}, {hw}, {hw}], {t} tasks, fwd+bwd, float32",
                          "note": "interpreter, not a speed" if interpreted else f"median of {reps}"})
    return lines


def report(args=None) -> dict:
    """The whole report as a dict (what ``--json`` prints); ``ok`` when every tested backend passes."""
    info = {"versions": versions(), "extension": extension(), "backends": backends()}
    only = getattr(args, "backend", None)
    if only:
        unknown = sorted(set(only) - {row["name"] for row in info["backends"]})
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; registered: {[r['name'] for r in info['backends']]}")
    tested = [row for row in info["backends"] if not only or row["name"] in only]
    info["self_test"] = self_test(tested)
    info["layers"] = layer_kinds()  # after the self-test: "auto" then reads its verdicts
    info["timing"] = [] if getattr(args, "no_timing", False) else timing(tested)
    info["ok"] = all(c["ok"] for c in info["self_test"])
    return info


def _print(info: dict) -> None:
    v, ext = info["versions"], info["extension"]
    print("gmem doctor")
    print(f"  python {v['python']} on {v['platform']}; torch {v['torch']} (CUDA build {v['torch_cuda']}); "
          f"triton {v['triton']}; numpy {v['numpy']}")
    print(f"  gmem from {v['gmem']}; cpu {v['cpu']} ({', '.join(v.get('cpu_features', [])) or 'no avx2'}), "
          f"{v['threads']} torch threads")
    if v["cuda_available"]:
        gpus = "; ".join(f"{g['index']}: {g['name']} (sm {g['capability']})" for g in v["gpus"])
        print(f"  CUDA: driver {v.get('driver')}, {gpus}")
    else:
        print("  CUDA: no GPU visible to torch")
    if v["env"]:
        print("  environment: " + " ".join(f"{k}={val}" for k, val in v["env"].items()))
    print("extension (csrc/)")
    if not ext["loaded"]:
        print(f"  not loaded: {ext['error']}")
    else:
        print(f"  loaded by {ext['how']}: {ext.get('path', '(path unknown)')}")
        if "sha256" in ext:
            print(f"  {ext['size_bytes']:,} bytes, modified {ext['mtime']}, sha256 {ext['sha256'][:16]}")
        if ext.get("cubins"):
            cubins = ", ".join(f"{arch} x{count}" for arch, count in ext["cubins"].items())
            print(f"  CUDA code: cubins {cubins}; PTX {', '.join(ext['ptx']) or 'none'}")
        else:
            print("  CUDA code: none (a CPU-only build)")
        for op, keys in ext["ops"].items():
            print(f"  op {op:34s} kernels: {', '.join(keys)}")
    print(f"  flags: c++ {' '.join(ext['cxx_flags'])}; nvcc {' '.join(ext['nvcc_flags'])}; "
          f"default archs {ext['default_cuda_archs']} (TORCH_CUDA_ARCH_LIST overrides)")
    print("backends (best first)")
    for row in info["backends"]:
        if row["available"]:
            dtypes = "; ".join(f"{d}: {', '.join(ts) or '-'}" for d, ts in row["dtypes"].items())
            auto = ", ".join(row["auto"]) or "never (explicit backend= only)"
            print(f"  {row['name']:10s} available   {dtypes}; auto on {auto}")
        else:
            print(f"  {row['name']:10s} unavailable: {row['reason']}")
    print("layer kinds (gmem.nn): what backend='auto' runs each on")
    for row in info["layers"]:
        print(f"  {row['kind']:28s} {row['device']:5s} {row['op']:22s} {row['runs']}")
    print("self-test vs the float64 reference (max error relative to the largest reference value)")
    for check in info["self_test"]:
        head = f"{check['backend']} {check['device']} {check['dtype']}"
        print(f"  {head:24s} {'PASS' if check['ok'] else 'FAIL'}  ({check['seconds']:.2f} s)")
        for case in check["cases"]:
            passed = case["error"] is None and all(e <= case["tol"] for e in case["errors"].values())
            mark = "ok  " if passed else "FAIL"
            if case["error"] is not None:
                detail = case["error"]
            else:
                fwd = case["errors"].get("out", float("nan"))
                bwd = max((e for k, e in case["errors"].items() if k != "out"), default=float("nan"))
                detail = f"fwd {fwd:.1e} bwd {bwd:.1e} (tol {case['tol']:.0e})"
            print(f"    {mark} {case['case']:27s} {detail}")
    if info["timing"]:
        print("timing")
        for line in info["timing"]:
            where = f"{line['backend']} {line['device']}"
            if "error" in line:
                print(f"  {where:16s} error: {line['error']}")
            else:
                print(f"  {where:16s} {line['ms']:9.2f} ms  {line['shape']} ({line['note']})")
    failed = [f"{c['backend']} {c['device']} {c['dtype']}: {c['failed']}" for c in info["self_test"] if not c["ok"]]
    if failed:
        print("verdict: FAIL; backend='auto' will not use these:")
        for line in failed:
            print(f"  {line}")
    else:
        print(f"verdict: every available backend passes ({len(info['self_test'])} backend/device/dtype checks)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-timing", action="store_true", help="skip the timing lines")
    p.add_argument("--backend", nargs="+", metavar="NAME", help="test only these backends (default: all available)")
    p.add_argument("--save", metavar="FILE", default=None, help="also write the JSON report to FILE")


def run(args: argparse.Namespace) -> int:
    info = report(args)
    if args.save:
        Path(args.save).write_text(json.dumps(info, indent=1, default=str))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        _print(info)
    return 0 if info["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gmem doctor", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
