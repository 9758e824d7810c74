"""Trust on first use: a compiled backend is checked against the reference before ``"auto"`` picks it.

The first time ``backend="auto"`` would choose a backend other than ``"reference"`` for a
``(device, dtype)``, :func:`trusted` runs :func:`run_cases` (a few tiny ops, forward and backward,
milliseconds) against the reference computed in float64, and caches the verdict on disk. A backend
that fails is never picked by ``"auto"``: one warning names the failing case and ``"auto"`` falls back
to the next backend. ``gmem doctor`` runs the same cases for every backend and prints them.

The verdict file lives in ``$GMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/gmem``, else ``~/.cache/gmem``,
under ``selfcheck/``; its name is a hash of what the verdict depends on: the backend's build (the
sha256 of the compiled library, or of the Triton kernel sources), the gmem Python ops, the device
name and driver, the dtype and the torch version. A rebuilt extension, another GPU or a new driver
gets a fresh check. Files are written atomically (temporary file + rename), so processes racing on
the first check both write a complete file; an unreadable file is ignored with a warning and rewritten.

``GMEM_SELFCHECK=0`` skips the check (every backend is trusted, as before). An explicit
``backend="name"`` (or ``GMEM_BACKEND=name``) is the user's choice and is never checked.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_write_bytes
from ..hashing import cached_file_digest
from ._selfcheck_cases import CASES, TF32_TOLERANCE, TOLERANCES, CaseResult, run_cases, tolerance  # noqa: F401

__all__ = ["CASES", "CaseResult", "Verdict", "cache_dir", "check", "reset", "run_cases", "tolerance", "trusted"]

FORMAT = 1
_OPS_DIR = Path(__file__).resolve().parent
_KERNELS_DIR = _OPS_DIR.parents[1] / "gmem_kernels"


# ---------------------------------------------------------------------------------------------
# What a verdict depends on
# ---------------------------------------------------------------------------------------------
def extension_path() -> Optional[Path]:
    """The compiled gmem_ext library loaded in this process (``gmem._C`` or a JIT build), or None."""
    module = sys.modules.get("gmem._C")
    if module is not None and getattr(module, "__file__", None):
        return Path(module.__file__)
    for lib in sorted(getattr(torch.ops, "loaded_libraries", ())):
        if "gmem_ext" in os.path.basename(lib):
            return Path(lib)
    return None


def build_id(name: str) -> str:
    """A hash of the code behind backend ``name``: its compiled library or kernel sources, plus the
    gmem Python ops that route calls to it (a change to either invalidates the verdict)."""
    from .backends import get_backend

    get_backend(name).is_available()  # loads what the backend runs (the extension), so it can be hashed
    digest = hashlib.sha256(f"{name} torch={torch.__version__}".encode())
    for path in sorted(_OPS_DIR.glob("*.py")):
        digest.update(path.name.encode() + cached_file_digest(path).encode())
    if name in ("cpu", "cuda"):
        lib = extension_path()
        digest.update(cached_file_digest(lib).encode() if lib else b"no extension")
    elif name == "triton":
        import importlib.metadata as md

        try:
            digest.update(md.version("triton").encode())
        except md.PackageNotFoundError:
            pass
        for path in sorted(_KERNELS_DIR.glob("*.py")):
            digest.update(path.name.encode() + cached_file_digest(path).encode())
    else:  # a backend registered by user code: the file that defines it
        import inspect

        cls = type(get_backend(name))
        digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        try:
            digest.update(cached_file_digest(Path(inspect.getsourcefile(cls))).encode())
        except (TypeError, OSError):
            pass
    return digest.hexdigest()[:24]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_driver_version() -> Optional[str]:
    """The CUDA driver version (e.g. ``"13.0"``) from libcuda, or None without one."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if handle.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    return None


def device_description(device: torch.device) -> dict:
    """What the device is, as far as a verdict depends on it: name, capability, driver."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}",
                "driver": cuda_driver_version(), "cuda": torch.version.cuda}
    return {"name": _cpu_name(), "machine": platform.machine()}


def cache_dir() -> Path:
    """``$GMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/gmem``, else ``~/.cache/gmem``."""
    if os.environ.get("GMEM_CACHE_DIR"):
        return Path(os.environ["GMEM_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "gmem"
    return Path.home() / ".cache" / "gmem"


# ---------------------------------------------------------------------------------------------
# Verdicts: computed once per build, device and dtype, cached on disk
# ---------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    backend: str
    device: str
    dtype: str
    ok: bool
    failed: Optional[str]  # the first failing case, described
    key: dict
    results: list = field(default_factory=list)  # CaseResult as dicts
    seconds: float = 0.0
    created: float = 0.0
    source: str = "checked"  # "checked" (run now) or "cache" (read from the file)


def _key(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    return {"format": FORMAT, "backend": name, "build": build_id(name), "device": device_description(device),
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__}


def verdict_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "selfcheck" / f"{key['backend']}-{key['dtype']}-{digest}.json"


def _read(path: Path, key: dict) -> Optional[Verdict]:
    """The cached verdict for ``key``, or None (absent; or unreadable, with a warning)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        warnings.warn(f"gmem: cannot read the self-check cache {path} ({err}); checking again", RuntimeWarning, 3)
        return None
    try:
        data = json.loads(text)
        if data["key"] != key:
            raise ValueError("its key does not match its name")
        verdict = Verdict(**{**data, "source": "cache"})
        if not isinstance(verdict.ok, bool):
            raise ValueError("no verdict in it")
        return verdict
    except (ValueError, KeyError, TypeError) as err:
        warnings.warn(f"gmem: ignoring the corrupted self-check cache file {path} ({err}); checking again",
                      RuntimeWarning, 3)
        return None


def _write(path: Path, verdict: Verdict) -> None:
    """Atomically (:mod:`gmem.atomic`): a reader sees the old file, the new one or none, never a part."""
    data = json.dumps({k: v for k, v in asdict(verdict).items() if k != "source"}, indent=1)
    try:
        atomic_write_bytes(path, data.encode())
    except OSError:  # a read-only cache: the verdict still holds for this process
        pass

def check(name: str, device, dtype: torch.dtype, *, use_cache: bool = True) -> Verdict:
    """The verdict on backend ``name`` for ``device``/``dtype``: from the cache, else by running the cases
    (and caching the result; ``use_cache=False`` always runs them and rewrites the cache)."""
    device = torch.device(device)
    key = _key(name, device, dtype)
    path = verdict_path(key)
    if use_cache:
        cached = _read(path, key)
        if cached is not None:
            return cached
    start = time.perf_counter()
    results = run_cases(name, device, dtype)
    failed = next((r.describe() for r in results if not r.ok), None)
    verdict = Verdict(name, str(device), key["dtype"], failed is None, failed, key,
                      [asdict(r) for r in results], round(time.perf_counter() - start, 4), time.time())
    _write(path, verdict)
    return verdict


_trust: dict = {}
_trust_lock = threading.RLock()


_generation = 0


def reset() -> None:
    """Forget this process's verdicts (the disk cache stays): the next "auto" checks or reads again."""
    global _generation
    with _trust_lock:
        _trust.clear()
        _generation += 1


def generation() -> int:
    """A number that changes whenever this process's verdicts are forgotten (:func:`reset`): what
    callers that remember a choice built on the verdicts compare."""
    return _generation


def settled() -> bool:
    """Whether the verdicts :func:`trusted` gives now are final; not while tracing with fake tensors,
    where an unchecked backend is trusted for that trace only."""
    return not _fake_tensors_active()


def _fake_tensors_active() -> bool:
    """Whether a fake-tensor mode is active (tracing that is not dynamo's own eager constant folding):
    the cases cannot run on real tensors there."""
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None  # noqa: SLF001
    except AttributeError:  # an older torch
        return False


_skipped_warned: set = set()


def trusted(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``"auto"`` may pick backend ``name`` on ``device``/``dtype`` (see the module docstring)."""
    index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
    memo = (name, device.type, index, dtype)
    verdict = _trust.get(memo)
    if verdict is not None:
        return verdict
    with _trust_lock:
        if memo in _trust:
            return _trust[memo]
        if name == "reference" or os.environ.get("GMEM_SELFCHECK", "1") == "0":
            _trust[memo] = True
            return True
        if device.type == "cuda":
            device = torch.device("cuda", index)
        if _fake_tensors_active():
            # "auto" resolved while tracing with fake tensors: use a cached verdict if there is one,
            # else trust the backend for this trace only (not remembered: the next eager call checks)
            key = _key(name, device, dtype)
            cached = _read(verdict_path(key), key)
            if cached is not None:
                _trust[memo] = cached.ok
                return cached.ok
            if memo not in _skipped_warned:
                _skipped_warned.add(memo)
                warnings.warn(f"gmem: the self-check of backend {name!r} on {device} with {dtype} was skipped while "
                              "tracing with fake tensors; it runs on the next eager call (or run `gmem doctor`)",
                              RuntimeWarning, 4)
            return True
        verdict = check(name, device, dtype)
        if not verdict.ok:
            warnings.warn(
                f"gmem: backend {name!r} failed its self-check on {device} with {dtype} ({verdict.failed}); "
                f"backend='auto' will not use it and falls back to the next backend. Run `gmem doctor` "
                f"for the full report; GMEM_SELFCHECK=0 skips the check.", RuntimeWarning, 4)
        _trust[memo] = verdict.ok
        return verdict.ok
