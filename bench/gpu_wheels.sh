#!/usr/bin/env bash
# Download, on a machine with a package index, the exact wheels that a lent GPU machine lacks
# (Python 3.12, manylinux x86-64; it has torch 2.11, triton 3.6, numpy, sympy, scipy, tqdm, pillow,
# einops but no index) into the ignored .whl/ folder; bench/gpu_validate.py installs them from there
# into a temporary target (pip install --no-index --no-deps). Every dependency is listed explicitly
# (--no-deps), torch, numpy and what the GPU machine already has are left out.
#
#   bash bench/gpu_wheels.sh            # then carry .whl/ with the working tree (< 64 MiB in all)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
# name==version: vector-quantize-pytorch at the top of setup.py's test range (<=1.32.0) and its
# dependencies; lpips (training's perceptual loss) with torchvision 0.26.0, the release paired with
# torch 2.11; constriction (training's entropy coder).
WHEELS=(
  vector-quantize-pytorch==1.32.0
  einx==0.4.3
  frozendict==2.5.1
  loguru==0.7.3
  torch-einops-utils==0.2.0
  lpips==0.1.4
  torchvision==0.26.0
  constriction==0.5.0
)
LIMIT_BYTES=$((60 * 1024 * 1024))  # leaves room for the checkout itself in the 64 MiB carried
rm -rf "$DEST"
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    --dest "$DEST" "$spec"
done
total=0
for f in "$DEST"/*.whl; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  printf '%9d  %s\n' "$size" "$(basename "$f")"
done
count=$(ls "$DEST"/*.whl | wc -l)
printf '%9d  total (%d wheels)\n' "$total" "$count"
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels, got $count" >&2
  exit 1
fi
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "wheels take $total bytes, more than $LIMIT_BYTES: they would not travel" >&2
  exit 1
fi
