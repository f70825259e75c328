#!/usr/bin/env bash
# The restoration leave-one-out (benchmarks/restoration.py) on one GPU machine, every fold at once:
# first one process per volume fills the shared cache of (decoded, original) pairs, then each held-out
# CT trains and is evaluated in its own process (one GPU, the host's cores shared between them).
#   FEDTENSOR_DATA=... benchmarks/gpu_restoration.sh
# ARGS: restoration.py options for every fold (default: channels 32/64, 3.5x the parameters of the CPU
# runs' net; add --eval-only to evaluate models already in RUN). FOLD_LIMIT: seconds each fold may take
# (on one H100 the four folds trained in 5 min together; evaluating them there takes several more).
# One log (lines prefixed by the fold) and one JSON per fold, plus the trained models (model.json +
# weights) as models.tar, go to $OUT (default results/gpu). See docs/bench/gpu_h100.md.
set -u
OUT=$(realpath -m "${OUT:-results/gpu}")
RUN=${RUN:-results/restoration_gpu}
VOLUMES=${VOLUMES:-"ct_chest.nii.gz ct_abdomen.nii.gz ct_head_uint8.nii.gz ct_series_dicom"}
VAL=${VAL:-mr_brain_gd.nii.gz}
ARGS=${ARGS:-"--codecs block-tucker --epochs 30 --patience 5 --channels 32 64 --batch 16 --patches-per-epoch 6400"}
PAIRS_LIMIT=${PAIRS_LIMIT:-150}
FOLD_LIMIT=${FOLD_LIMIT:-1800}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # several JAX processes share the GPU
mkdir -p "$OUT" "$RUN"
echo "=== pairs $(date +%T)"
for v in $VOLUMES $VAL; do
    # shellcheck disable=SC2086
    timeout "$PAIRS_LIMIT" python3 benchmarks/restoration.py --pairs-only --volumes "$v" --val-volumes --out "$RUN" $ARGS \
        2>&1 | sed -u "s/^/[pairs ${v%%.*}] /" &
done
wait
echo "=== folds $(date +%T)"
for v in $VOLUMES; do
    # shellcheck disable=SC2086
    timeout "$FOLD_LIMIT" python3 benchmarks/restoration.py --volumes $VOLUMES --val-volumes "$VAL" --folds "$v" \
        --out "$RUN" $ARGS --json "$OUT/loo-${v%%.*}.json" 2>&1 | sed -u "s/^/[${v%%.*}] /" &
done
wait
echo "=== done $(date +%T)"
(cd "$RUN" && find models -name model.json -o -name model.safetensors -o -name history.csv | tar -cf "$OUT/models.tar" -T -)
