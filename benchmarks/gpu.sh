#!/usr/bin/env bash
# One GPU, one table, <= 8 minutes, as is on any machine with an NVIDIA GPU (what runs: benchmarks/gpu.py), with
# the ImageNet-64 train step timed in both formulations, plain and XLA:CPU's (ddjax/models/xla_cpu.py).
#
#   bash benchmarks/gpu.sh
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh    # the same runs at digits size on any machine, the CPU included
#
# Installs this checkout into $PYTHON (default python3) without replacing a jax that is already there: pip leaves
# an installed jax that satisfies ddjax's jax>=0.10 alone, and the constraints below pin it and its jaxlib so
# nothing pulls another. Only when no CUDA plugin is installed does it add the cuda12 or cuda13 extra
# (jax[cuda12] / jax[cuda13], pyproject.toml), cuda13 when the NVIDIA driver is >= 580. If pip cannot reach an
# index, the checkout runs as it is when its imports already resolve.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}                       # one GPU
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}  # the largest batch that fits 95%

extra=""
if [[ "${GPU_SH_SMOKE:-0}" != 1 ]] && command -v nvidia-smi >/dev/null \
    && ! "$PYTHON" -m pip show -q jax-cuda12-plugin 2>/dev/null && ! "$PYTHON" -m pip show -q jax-cuda13-plugin 2>/dev/null; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
  extra=$([[ ${driver%%.*} -ge 580 ]] && echo '[cuda13]' || echo '[cuda12]')
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" - >"$constraints" <<'PY'
from importlib import metadata
for name in ('jax', 'jaxlib'):
  try:
    print(f'{name}=={metadata.version(name)}')
  except metadata.PackageNotFoundError:
    pass
PY
echo "[gpu.sh] pip install -e .$extra (keeping: $(tr '\n' ' ' <"$constraints"))" >&2
if ! "$PYTHON" -m pip install --quiet -e ".$extra" -c "$constraints"; then
  echo "[gpu.sh] pip install failed; running the checkout as it is" >&2
fi
"$PYTHON" -c 'import jax, ddjax.benchmark; print("[gpu.sh] jax", jax.__version__, jax.devices())' >&2
exec "$PYTHON" benchmarks/gpu.py
