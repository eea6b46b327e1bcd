"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment, before any JAX computation.

Every process runs the same program (JAX's multi-controller runtime); each sees all devices of all hosts.
Settings come from the --coordinator_address / --num_processes / --process_id flags, else from the
DDJAX_COORDINATOR_ADDRESS / DDJAX_NUM_PROCESSES / DDJAX_PROCESS_ID environment variables, else from SLURM
(srun with more than one task: JAX reads SLURM's variables itself). None of these: one process.
"""
import os
import socket
import time

import jax

from ddjax.validation import check, fail


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


def initialize(coordinator_address=None, num_processes=None, process_id=None, *, timeout_s: int = 300):
  """Join the multi-host job if one is configured; returns jax.process_count()."""
  settings = settings_from(coordinator_address, num_processes, process_id)
  if settings is None and not in_slurm_job():
    return 1
  # CPU devices of different processes exchange collectives over TCP (gloo); accelerators are unaffected.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {} if settings is None else dict(zip(('coordinator_address', 'num_processes', 'process_id'), settings))
  if settings is not None and settings[2] > 0:
    wait_for_coordinator(settings[0], timeout_s)
  jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
  return jax.process_count()


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
