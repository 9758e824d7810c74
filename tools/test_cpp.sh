#!/usr/bin/env bash
# C++ side of `make test`: builds the torch-free CPU kernels with CMake and runs their unit tests
# and the CUDA kernels under a CPU emulation of the launch model (ctest), then compiles every CUDA
# source under csrc/ with nvcc when a CUDA toolkit is found (no GPU needed; nothing runs).
# Build trees: build/cmake-cpu, build/cmake-cuda (gitignored; the contract's own `cmake -B build`
# uses build/ itself and does not clash).
# Usage: tools/test_cpp.sh   (GMEM_SKIP_CUDA_COMPILE=1 skips the nvcc part)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

echo "== C++ CPU kernels: build + ctest"
cmake -S . -B build/cmake-cpu -DGMEM_WITH_CUDA=OFF >/dev/null
cmake --build build/cmake-cpu --parallel "$jobs"
ctest --test-dir build/cmake-cpu --output-on-failure

if [[ "${GMEM_SKIP_CUDA_COMPILE:-0}" == "1" ]]; then
  echo "== CUDA kernels: skipped (GMEM_SKIP_CUDA_COMPILE=1)"
elif command -v nvcc >/dev/null 2>&1 || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  echo "== CUDA kernels: compile every csrc/**/*.cu with nvcc (sm_${GMEM_CUDA_ARCH:-90})"
  cmake -S . -B build/cmake-cuda -DGMEM_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${GMEM_CUDA_ARCH:-90}" >/dev/null
  cmake --build build/cmake-cuda --parallel "$jobs"
else
  echo "== CUDA kernels: no nvcc found, not compiled"
fi
