#!/usr/bin/env bash
# fedtensor demo: compress a CT volume at 45 dB PSNR, decompress it, and evaluate the result.
#
#   bash examples/demo.sh [INPUT]        (default: examples/data/ct_head_uint8.nii.gz)
#
# Environment: PYTHON (default: .venv/bin/python, else python3), DEMO_OUT (default: results/demo),
# DEMO_PSNR (default: 45). `make demo` sets PYTHON to the project's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

input=${1:-examples/data/ct_head_uint8.nii.gz}
out=${DEMO_OUT:-results/demo}
target=${DEMO_PSNR:-45}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
[[ -e "$input" ]] || { echo "error: demo input not found: $input" >&2; exit 1; }

name=$(basename "$input"); name=${name%.gz}; name=${name%.nii}; name=${name%.npy}
mkdir -p "$out"
ftz="$out/$name.ftz"
decoded="$out/${name}_decoded.nii.gz"
fedtensor() { "$PYTHON" -m fedtensor_cli "$@"; }

echo "== 1/3 compress $input at $target dB PSNR → $ftz"
fedtensor compress "$input" "$ftz" --psnr "$target" --force
echo
echo "== 2/3 decompress $ftz → $decoded"
fedtensor decompress "$ftz" "$decoded" --force
echo
echo "== 3/3 evaluate $decoded against $input"
fedtensor evaluate "$input" "$decoded"
echo
echo "Outputs are in $out/ (inspect the stream with: $PYTHON -m fedtensor_cli info $ftz)"
