#!/usr/bin/env bash
# One batch of the GPU figures (kernels, codec throughput next to OpenJPEG, federated vmap vs loop,
# restoration speed, the kernel/streaming tests on the GPU), each step under its own time limit so one
# slow step cannot eat the rest. Logs and JSON go to $OUT (default results/gpu, which git ignores).
#   FEDTENSOR_DATA=... J2K_LEVELS="L256 L512" benchmarks/gpu_run.sh
# J2K_LEVELS: OpenJPEG levels for the throughput shapes found by an earlier (CPU) run of
# `benchmarks/throughput.py --no-fedtensor` — the volumes are deterministic, so the bisection need not
# be repeated on the GPU machine. STEPS picks a subset; SHAPES and FED_ARGS change those steps' sizes.
# FEDTENSOR_WORKERS passes through: the entropy coder's worker count (by default one per slab group and
# core, within 1.5x the input's size of memory or 512 MB: eight at 512³); compare with FEDTENSOR_WORKERS=1.
set -u
OUT=${OUT:-results/gpu}
STEPS=${STEPS:-"kernels throughput federated restoration_speed gpu_tests reproducibility"}
REPRO_ARGS=${REPRO_ARGS:-"--volumes ct_chest.nii.gz ct_abdomen.nii.gz ct_head_uint8.nii.gz --targets 38 40 42"}
SHAPES=${SHAPES:-"256x256x256 512x512x512"}
FED_ARGS=${FED_ARGS:-"--clients 8 32 128 --chunk 128"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name exit ${PIPESTATUS[0]} $(date +%T)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
levels=()
[ -n "${J2K_LEVELS:-}" ] && levels=(--j2k-levels $J2K_LEVELS)
step kernels 100 python3 benchmarks/kernels.py --shape 512x512x512 --blocks 8x8x8 4x4x8 8x8x16 16x16x8 --repeat 3 \
    --json "$OUT/kernels.json"
step gpu_tests 70 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_stream.py
step restoration_speed 60 python3 benchmarks/restoration_speed.py --batch 8 32 128 --json "$OUT/restoration_speed.json"
step federated 70 python3 benchmarks/federated.py $FED_ARGS
step throughput 220 python3 benchmarks/throughput.py --shapes $SHAPES ${levels[@]+"${levels[@]}"} --json "$OUT/throughput.json"
# The encoder's streams compared across fresh processes, as XLA comes and with deterministic GPU ops;
# the two runs share the GPU (no preallocation), which also puts the autotuner under load.
repro() {
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/reproducibility.py $REPRO_ARGS --json "$OUT/repro_default.json" &
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
        python3 benchmarks/reproducibility.py $REPRO_ARGS --json "$OUT/repro_deterministic.json"
    wait
}
[[ " $STEPS " == *" reproducibility "* ]] && { echo "=== reproducibility $(date +%T)"; timeout 300 bash -c "$(declare -f repro); OUT=$OUT REPRO_ARGS='$REPRO_ARGS' repro" 2>&1 | tee "$OUT/reproducibility.log"; }

