#!/usr/bin/env bash
# The GPU check, prepared for a session that is lent a GPU: one command, at most 8 minutes, every
# step time-boxed so that what finished comes back even when a later step runs out of time.
#
#   bash tools/gpu_check.sh            # on the GPU machine, from the repository root; writes to $OUT
#   DEVICE=cpu BUILD=0 bash tools/gpu_check.sh   # the same steps on this CPU machine (a dry run of the script)
#
# With the device tool: run(command="bash tools/gpu_check.sh", timeout_s=600). The GPU machine has
# torch, triton, nvcc, pytest and pytest-benchmark but no network, so the extension is built there
# from csrc/ (sm_90 only, to save time). Steps, in order of value:
#   1. build gmem._C with the CUDA kernels                      -> build.txt
#   2. `gmem doctor`: every backend against the reference, all dtypes; its verdicts are cached for
#      backend="auto" before any benchmark runs                 -> doctor.txt, doctor.json
#   3. GPU correctness: C++/CUDA backend, op paths, Triton      -> tests.txt (pytest -rs: skips listed)
#   4. the quick benchmark suite on the GPU (no torch.compile)  -> <card>-quick.json, bench-quick.txt
#   5. GP-GAN-size cases: single-task convs, 64 tasks in a batch of 64, low rank
#                                                              -> <card>-gpgan.json, bench-gpgan.txt
# Afterwards, on the CPU machine: copy the JSON files into benchmarks/results/ (their names carry the
# card), `python -m benchmarks.report benchmarks/results/*.json --markdown`, and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gmem-gpu-check}"
DEVICE="${DEVICE:-cuda}"
BUILD="${BUILD:-1}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
start=$(date +%s)
log() { echo "== +$(( $(date +%s) - start ))s $*" | tee -a "$OUT/log.txt"; }

# step NAME SECONDS COMMAND...: run with a time limit, keep its output, log how it ended
step() {
  local name="$1" limit="$2"
  shift 2
  log "$name: $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  log "$name: exit $rc$([[ $rc == 124 ]] && echo ' (time limit)')"
  tail -n 3 "$OUT/$name.txt" | sed 's/^/     /' | tee -a "$OUT/log.txt"
}

if [[ "$DEVICE" == cuda ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
  card=$(sed -n 2p "$OUT/gpu.txt" | cut -d, -f1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_-' | tr 'A-Z' 'a-z')
else
  card="cpu-dry-run"
fi
card="${card:-gpu}"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/log.txt" 2>&1

if [[ "$BUILD" == 1 ]]; then
  step build 150 env TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
fi
"$PY" -c "import gmem.ops as ops; print('backends:', ops.available_backends())" >> "$OUT/log.txt" 2>&1

# first, so that the first lent GPU leaves the self-check verdicts (and a failing kernel shows up
# before any benchmark times it)
step doctor 90 "$PY" -m gmem.doctor --save "$OUT/doctor.json"

step tests 150 "$PY" -m pytest -q --maxfail=10 -rs -p no:cacheprovider \
  tests/test_cpp_backend.py tests/test_op_paths.py tests/test_triton.py

step bench-quick 60 "$PY" -m benchmarks.run --quick --device "$DEVICE" --no-e2e \
  --providers reference cuda triton cpu plain grouped_conv per_task_plain --json "$OUT/$card-quick.json"

# The issue targets at GP-GAN size, each case with the one it is compared with: single task vs plain
# (1.10x; block4 also >= 1.5x reference), 64 tasks in a batch of 64 vs the 1-task mixed batch (1.25x)
# and vs reference (5x), low rank vs dense styles (1.15x). The --json file is rewritten after every
# case, so a step cut short by its time limit keeps the cases it finished.
L=gpgan256.G.block16.conv_0
step bench-gpgan 120 "$PY" -m benchmarks.run --device "$DEVICE" --no-e2e --ops modulated_conv2d \
  --filter "$L N64 fp32 fwd+bwd" "$L N64 tf32 fwd+bwd" "$L N64 T1-uniform tf32 fwd+bwd" \
  "$L N64 T64-uniform tf32 fwd+bwd" "$L N64 r32 tf32 fwd+bwd" "$L N64 T64-uniform r32 tf32 fwd+bwd" \
  "gpgan256.G.block4.conv_0 N64 fp32 fwd+bwd" \
  --providers reference cuda triton plain grouped_conv per_task_plain --json "$OUT/$card-gpgan.json"

log "done; files in $OUT"
ls -l "$OUT" | tee -a "$OUT/log.txt"
