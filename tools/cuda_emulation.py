"""Rewrite the CUDA kernel sources for the CPU emulation of CUDA's launch model.

No GPU has to be present for the kernels' logic to be tested: the sources under csrc/cuda (*.cu, *.cuh, launchers.h) are
rewritten so that a plain C++ compiler builds them against csrc/tests/cuda_emulation.h, which runs
every CUDA thread of a block as an OS thread (``__syncthreads`` is a barrier) and the blocks one
after another. The rewrite is mechanical and leaves the kernel bodies untouched:

* ``kernel<T><<<grid, block, shared, stream>>>(args)`` -> ``gmem_emulate_launch(grid, block, shared,
  stream, &kernel<T>, args)``;
* the CUDA toolkit headers (``#include <cuda...h>``) -> ``#include "cuda_emulation.h"``;
* ``name.cu`` -> ``name.cpp``; headers keep their names.

Usage (CMakeLists.txt runs it for the ``test_cuda_kernels_emulated`` ctest):
    python tools/cuda_emulation.py OUT_DIR csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/launchers.h
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
CUDA_INCLUDE = re.compile(r'^#include <cuda[\w_]*\.h>\s*$', re.M)


def rewrite(text: str) -> str:
    text = LAUNCH.sub(lambda m: f"gmem_emulate_launch({' '.join(m.group(2).split())}, &{m.group(1)}, ", text)
    if CUDA_INCLUDE.search(text):
        first = True

        def include(_match):
            nonlocal first
            line = '#include "cuda_emulation.h"' if first else ""
            first = False
            return line

        text = CUDA_INCLUDE.sub(include, text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in argv[2:]:
        src = Path(name)
        text = src.read_text()
        if src.suffix == ".cu" and "<<<" not in text:
            raise SystemExit(f"cuda_emulation: no kernel launch found in {src}")
        target = out / (src.stem + ".cpp" if src.suffix == ".cu" else src.name)
        new = rewrite(text)
        if "<<<" in new:
            raise SystemExit(f"cuda_emulation: a launch in {src} was not rewritten")
        if not target.exists() or target.read_text() != new:  # untouched files keep their timestamps
            target.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
