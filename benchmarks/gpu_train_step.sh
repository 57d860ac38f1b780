#!/usr/bin/env bash
# One-shot GPU check for a lent accelerator machine: the CelebA-64 train-step benchmark at the official
# batch (256) in float32 (JAX default precision: TF32 on NVIDIA) and in bf16 compute. Wheels missing on
# that machine (grain, array_record, ml_collections, portpicker) travel in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 benchmarks/train_step.py --config configs/celeba64.py --steps 10 \
    --out "$OUT/train_step_celeba64_gpu_fp32.json" 2>&1 | grep -v "^W\|^I1"
python3 benchmarks/train_step.py --config configs/celeba64.py --steps 10 --set model.dtype=bfloat16 \
    --out "$OUT/train_step_celeba64_gpu_bf16.json" 2>&1 | grep -v "^W\|^I1"
