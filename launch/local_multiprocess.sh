#!/usr/bin/env bash
# N ddjax processes on this machine, each with D CPU devices, joined through jax.distributed (gloo collectives):
# the multi-host code path without a cluster. Process 0 is the coordinator and the only one writing files.
#
#   launch/local_multiprocess.sh N D <ddjax.main arguments>
#   launch/local_multiprocess.sh 2 2 --config configs/digits.py --workdir workdir/digits_2proc
#
# If one process fails the others are stopped, and the script exits with the first failure's status.
set -euo pipefail
num_processes=$1 devices=$2
shift 2
python=${PYTHON:-python3}
port=${DDJAX_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    DDJAX_COORDINATOR_ADDRESS="127.0.0.1:$port" DDJAX_NUM_PROCESSES="$num_processes" DDJAX_PROCESS_ID="$i" \
    "$python" -m ddjax.main "$@" &
  pids+=($!)
done
status=0
for ((i = 0; i < num_processes; i++)); do
  wait -n && continue
  code=$?
  if [ "$status" -eq 0 ]; then  # the first failure: stop the rest instead of leaving them in a collective
    status=$code
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
