"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment, before any JAX computation.

Every process runs the same program (JAX's multi-controller runtime); each sees all devices of all hosts.
Settings come from the --coordinator_address / --num_processes / --process_id flags, else from the
DDJAX_COORDINATOR_ADDRESS / DDJAX_NUM_PROCESSES / DDJAX_PROCESS_ID environment variables, else from SLURM
(srun with more than one task: JAX reads SLURM's variables itself). None of these: one process.

ddjax runs one process per host, driving every GPU of that host (launch/slurm.sbatch: one task per node), so
the local devices are passed explicitly: left to itself, JAX's SLURM detection gives each process only the GPU
numbered SLURM_LOCALID, i.e. one GPU per node.
"""
import importlib.util
import os
import socket
import sys
import time

import jax

from ddjax.validation import check, fail

# Where a process learns which GPUs it was given, most specific first: CUDA's own list (what CUDA enumerates,
# renumbered from 0), SLURM's for this job step, for this node and for the job, then the container runtime's.
GPU_VARIABLES = ('CUDA_VISIBLE_DEVICES', 'SLURM_STEP_GPUS', 'SLURM_GPUS_ON_NODE', 'SLURM_JOB_GPUS',
                 'NVIDIA_VISIBLE_DEVICES')
NO_DEVICE = ('NoDevFiles', 'none', 'void')  # SLURM's and the NVIDIA container runtime's words for no GPU
GPU_FIX = "pip install -e '.[cuda12]'"


def settings_from(coordinator_address=None, num_processes=None, process_id=None, environ=os.environ):
  """(coordinator_address, num_processes, process_id) or None for a single process; validated."""
  coordinator_address = coordinator_address or environ.get('DDJAX_COORDINATOR_ADDRESS')
  num_processes = num_processes if num_processes is not None else environ.get('DDJAX_NUM_PROCESSES')
  process_id = process_id if process_id is not None else environ.get('DDJAX_PROCESS_ID')
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes, 'process_id': process_id}
  if not any(v is not None for v in given.values()):
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    fail(missing[0], None, f'set together with {", ".join(k for k in given if k not in missing)} (all three '
         'of coordinator_address, num_processes, process_id, or none)')
  host, _, port = str(coordinator_address).rpartition(':')
  check(bool(host) and port.isdigit(), 'coordinator_address', coordinator_address, 'host:port')
  check(str(num_processes).isdigit() and int(num_processes) >= 1, 'num_processes', num_processes,
        'an integer >= 1')
  check(str(process_id).isdigit() and int(process_id) < int(num_processes), 'process_id', process_id,
        f'an integer in [0, {int(num_processes) - 1}] (num_processes={num_processes})')
  return str(coordinator_address), int(num_processes), int(process_id)


def in_slurm_job(environ=os.environ) -> bool:
  return int(environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_PROCID' in environ


def gpu_variable(environ=os.environ):
  """(name, number of GPUs) of the first GPU_VARIABLES entry set, or None; the number is None when the value
  says "some" without a count (NVIDIA_VISIBLE_DEVICES=all).

  The first variable set decides, so CUDA_VISIBLE_DEVICES='' (an empty list: no GPU) overrides SLURM's.
  """
  name = next((name for name in GPU_VARIABLES if name in environ), None)
  if name is None:
    return None
  value = environ[name].strip()
  if name == 'SLURM_GPUS_ON_NODE':
    return name, (int(value) if value.isdigit() else 0)
  return name, (None if value == 'all' else count_listed(value))


def count_listed(devices: str) -> int:
  """Entries of a device list up to the first that names no device: CUDA reads CUDA_VISIBLE_DEVICES so."""
  count = 0
  for entry in devices.split(','):
    entry = entry.strip()
    if not entry or entry.startswith('-') or entry in NO_DEVICE:
      break
    count += 1
  return count


def local_device_ids(environ=os.environ):
  """The GPU ordinals this process drives: all that its task sees, [0, n); None leaves the choice to JAX.

  JAX restricts a process launched by SLURM to GPU number SLURM_LOCALID unless told otherwise (that suits one
  task per GPU). ddjax's layout is one task per node, so every GPU the task was given is passed. None when
  several SLURM tasks share a node (they share its GPUs: JAX's one each is then right), when the GPUs are not
  counted by any variable, or when JAX_LOCAL_DEVICE_IDS (JAX's own override) is set.
  """
  tasks = int(environ.get('SLURM_NTASKS', '1'))
  nodes = int(environ.get('SLURM_STEP_NUM_NODES') or environ.get('SLURM_NNODES') or tasks)
  found = gpu_variable(environ)
  if tasks > nodes or 'JAX_LOCAL_DEVICE_IDS' in environ or found is None or not found[1]:
    return None
  return list(range(found[1]))


def cuda_plugin_installed() -> bool:
  return any(importlib.util.find_spec(name) for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


def warn_if_accelerators_missing(environ=os.environ):
  """One loud stderr line when GPUs were asked for but JAX runs on the CPU: without it a GPU job that got the
  CPU-only jaxlib (a plain `pip install -e .`) trains for days at CPU speed, its only clue a device count.

  An explicit JAX_PLATFORMS without cuda/gpu is a choice, not a mistake. When no CUDA plugin is installed the
  backend can only be the CPU: this line is then printed before the backend starts, ahead of JAX's own logs.
  """
  found = gpu_variable(environ)
  platforms = environ.get('JAX_PLATFORMS', '')
  if found is None or found[1] == 0 or (platforms and not {'cuda', 'gpu'} & set(platforms.split(','))):
    return
  if cuda_plugin_installed() and jax.default_backend() != 'cpu':
    return
  name = found[0]
  print(f'ddjax: WARNING: JAX runs on the CPU although {name}={environ[name]!r} asks for GPUs; install the '
        f'CUDA build of JAX with {GPU_FIX} (if it is installed, check that this process sees the GPUs: '
        'nvidia-smi)', file=sys.stderr, flush=True)


def initialize(coordinator_address=None, num_processes=None, process_id=None, *, timeout_s: int = 300):
  """Join the multi-host job if one is configured, then warn if GPUs were asked for in vain; returns the
  number of processes."""
  settings = settings_from(coordinator_address, num_processes, process_id)
  multi_process = settings is not None or in_slurm_job()
  if multi_process:
    join(settings, timeout_s)
  warn_if_accelerators_missing()
  return jax.process_count() if multi_process else 1


def join(settings, timeout_s: int):
  """jax.distributed.initialize with `settings` (None: JAX reads SLURM's variables) and all local GPUs."""
  # CPU devices of different processes exchange collectives over TCP (gloo); accelerators are unaffected.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {} if settings is None else dict(zip(('coordinator_address', 'num_processes', 'process_id'), settings))
  if settings is not None and settings[2] > 0:
    wait_for_coordinator(settings[0], timeout_s)
  jax.distributed.initialize(**kwargs, local_device_ids=local_device_ids(), initialization_timeout=timeout_s)


def wait_for_coordinator(address: str, timeout_s: float):
  """Return once `address` accepts TCP connections; a one-line ConfigError after `timeout_s`.

  The runtime itself aborts the process with a gRPC trace when the coordinator is unreachable; checking first
  turns the common mistakes (wrong host or port, process 0 not started) into a message naming both.
  """
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        fail('coordinator_address', address, f'a coordinator (process 0) reachable within {timeout_s} s '
             f'(--coordinator_timeout); last attempt: {error}')
      time.sleep(0.5)
