#!/usr/bin/env bash
# One host, all its accelerators: a single process sees every local GPU/TPU and splits the global batch over
# them (no per-GPU processes, no torchrun).
#
#   launch/single_host.sh --config configs/imagenet64_res_res.py --workdir /data/runs/res_res
#
# CUDA_VISIBLE_DEVICES selects GPUs; XLA_PYTHON_CLIENT_MEM_FRACTION bounds JAX's share of their memory. GPUs need
# JAX's CUDA build (pip install -e '.[cuda12]'); without it ddjax says so on its first line and runs on the CPU.
set -euo pipefail
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${PYTHON:-python3}" -m ddjax.main "$@"
