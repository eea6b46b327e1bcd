"""Multi-host start-up: SLURM's environment simulated for two local processes, the GPUs a process is given,
the warning when GPUs were asked for but JAX runs on the CPU, and the checks on the multi-host settings."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ddjax import distributed
from ddjax.validation import ConfigError
from tests.tiny import REPO, run_main, xla_flags

# What each process reports after ddjax.distributed.initialize, as ddjax.main calls it; jax_cuda_visible_devices
# is the GPU list JAX would open ('all' when unrestricted).
REPORT = """
import json, jax
from ddjax import distributed
distributed.initialize(timeout_s=60)
print(json.dumps({'process_index': jax.process_index(), 'process_count': jax.process_count(),
                  'local_devices': jax.local_device_count(), 'devices': jax.device_count(),
                  'cuda_visible_devices': jax.config.read('jax_cuda_visible_devices')}))
"""

SLURM_PORTS = range(65535 - 2**12 + 1, 65536)  # JAX's SLURM coordinator port: SLURM_JOB_ID % 4096 + 61440


def free_slurm_port() -> int:
  """The first port of SLURM_PORTS nobody listens on, so the job id that maps to it is free to use."""
  for port in SLURM_PORTS:
    with socket.socket() as s:
      try:
        s.bind(('0.0.0.0', port))
        return port
      except OSError:
        continue
  pytest.skip('no free port in 61440-65535')


def slurm_task(job_id: int, procid: int) -> dict:
  """The environment srun gives task `procid` of `srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=2` (all
  nodes 127.0.0.1), with 2 fake CPU devices standing in for the 2 GPUs."""
  inherited = {k: v for k, v in os.environ.items()
               if not k.startswith(('SLURM_', 'DDJAX_', 'JAX_COORDINATOR', 'JAX_LOCAL_DEVICE_IDS'))
               and k not in distributed.GPU_VARIABLES}
  return dict(inherited, SLURM_JOB_ID=str(job_id), SLURM_NTASKS='2', SLURM_PROCID=str(procid), SLURM_LOCALID='0',
              SLURM_NODELIST='127.0.0.1', SLURM_STEP_NODELIST='127.0.0.1', SLURM_NNODES='2',
              SLURM_JOB_NUM_NODES='2', SLURM_STEP_NUM_NODES='2', SLURM_GPUS_ON_NODE='2', SLURM_STEP_GPUS='0,1',
              CUDA_VISIBLE_DEVICES='0,1', JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(2))


def test_two_slurm_tasks_see_every_device_of_both():
  port = free_slurm_port()
  job_id = 7 * 2**12 + port - SLURM_PORTS.start
  processes = [subprocess.Popen([sys.executable, '-c', REPORT], cwd=REPO, env=slurm_task(job_id, i),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in processes]
  for i, (p, (stdout, stderr)) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, stderr[-3000:]
    assert 'ddjax: WARNING' not in stderr  # JAX_PLATFORMS=cpu was asked for
    # Process i of 2, 2 local + 2 remote devices, and both GPUs of its node opened (JAX alone: only GPU 0).
    assert json.loads(stdout.splitlines()[-1]) == {'process_index': i, 'process_count': 2, 'local_devices': 2,
                                                   'devices': 4, 'cuda_visible_devices': '0,1'}


ONE_TASK_PER_NODE = {'SLURM_NTASKS': '2', 'SLURM_STEP_NUM_NODES': '2', 'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}


@pytest.mark.parametrize('environ, want', [
    ({**ONE_TASK_PER_NODE, 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7', 'SLURM_GPUS_ON_NODE': '8'}, list(range(8))),
    ({**ONE_TASK_PER_NODE, 'SLURM_GPUS_ON_NODE': '8'}, list(range(8))),
    # Half a node: CUDA numbers the GPUs it is shown from 0, whatever their ids on the node.
    ({**ONE_TASK_PER_NODE, 'CUDA_VISIBLE_DEVICES': '4,5,6,7', 'SLURM_STEP_GPUS': '4,5,6,7'}, [0, 1, 2, 3]),
    ({**ONE_TASK_PER_NODE, 'SLURM_STEP_GPUS': '4,5,6,7'}, [0, 1, 2, 3]),
    ({'SLURM_NTASKS': '2', 'SLURM_NNODES': '2', 'SLURM_JOB_GPUS': '0,1'}, [0, 1]),
    ({'CUDA_VISIBLE_DEVICES': '0,1,-1,2'}, [0, 1]),  # CUDA stops at the first invalid entry
    # Eight tasks per node share its GPUs: JAX's own choice, GPU number SLURM_LOCALID for each.
    ({'SLURM_NTASKS': '16', 'SLURM_STEP_NUM_NODES': '2', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}, None),
    ({**ONE_TASK_PER_NODE, 'CUDA_VISIBLE_DEVICES': '0,1', 'JAX_LOCAL_DEVICE_IDS': '1'}, None),
    ({**ONE_TASK_PER_NODE, 'CUDA_VISIBLE_DEVICES': '', 'SLURM_GPUS_ON_NODE': '8'}, None),  # empty: no GPU
    ({**ONE_TASK_PER_NODE, 'CUDA_VISIBLE_DEVICES': 'NoDevFiles'}, None),
    ({**ONE_TASK_PER_NODE, 'NVIDIA_VISIBLE_DEVICES': 'all'}, None),  # some GPUs, how many unknown
    (ONE_TASK_PER_NODE, None),
    ({}, None),
])
def test_local_device_ids(environ, want):
  assert distributed.local_device_ids(environ) == want


@pytest.mark.parametrize('name, value', [
    ('CUDA_VISIBLE_DEVICES', '0,1'), ('SLURM_GPUS_ON_NODE', '8'), ('SLURM_STEP_GPUS', '0'),
    ('SLURM_JOB_GPUS', '0,1,2,3'), ('NVIDIA_VISIBLE_DEVICES', 'all'),
])
def test_gpus_asked_for_on_cpu_warn(name, value, monkeypatch, capsys):
  monkeypatch.setattr(distributed, 'cuda_plugin_installed', lambda: False)
  distributed.warn_if_accelerators_missing({name: value})
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('ddjax: WARNING: JAX runs on the CPU')
  assert f'{name}={value!r}' in lines[0] and "pip install -e '.[cuda12]'" in lines[0]


@pytest.mark.parametrize('environ', [
    {}, {'CUDA_VISIBLE_DEVICES': ''}, {'CUDA_VISIBLE_DEVICES': '-1'}, {'CUDA_VISIBLE_DEVICES': 'NoDevFiles'},
    {'CUDA_VISIBLE_DEVICES': '', 'SLURM_GPUS_ON_NODE': '8'}, {'SLURM_GPUS_ON_NODE': '0'},
    {'NVIDIA_VISIBLE_DEVICES': 'void'}, {'CUDA_VISIBLE_DEVICES': '0', 'JAX_PLATFORMS': 'cpu'},
])
def test_no_gpus_asked_for_no_warning(environ, capsys):
  distributed.warn_if_accelerators_missing(environ)
  assert capsys.readouterr().err == ''


def test_gpus_found_no_warning(monkeypatch, capsys):
  monkeypatch.setattr(distributed, 'cuda_plugin_installed', lambda: True)
  monkeypatch.setattr(distributed.jax, 'default_backend', lambda: 'gpu')
  distributed.warn_if_accelerators_missing({'CUDA_VISIBLE_DEVICES': '0,1', 'JAX_PLATFORMS': 'cuda'})
  assert capsys.readouterr().err == ''


@pytest.mark.skipif(distributed.cuda_plugin_installed(), reason='needs the CPU-only jaxlib')
def test_cpu_run_asked_for_gpus_says_so_first(tmp_path):
  # An invalid setting stops ddjax.main right after start-up, before any training.
  result = run_main(tmp_path, env={'CUDA_VISIBLE_DEVICES': '0', 'JAX_PLATFORMS': ''}, **{'parallel.mode': 'pjit'})
  lines = result.stderr.splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert lines[0].startswith("ddjax: WARNING: JAX runs on the CPU although CUDA_VISIBLE_DEVICES='0'")
  assert lines[-1].startswith('ddjax: invalid config: parallel.mode=')


def test_unreachable_coordinator_fails_fast_with_its_address(tmp_path):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  start = time.time()
  result = run_main(tmp_path, extra_args=['--coordinator_address', f'127.0.0.1:{port}', '--num_processes', '2',
                                          '--process_id', '1', '--coordinator_timeout', '5'])
  assert result.returncode == 2 and time.time() - start < 120
  message = [line for line in result.stderr.splitlines() if line.startswith('ddjax:')]
  assert len(message) == 1 and f'127.0.0.1:{port}' in message[0] and '5 s' in message[0]


@pytest.mark.parametrize('flags, key', [
    (['--num_processes', '2', '--process_id', '0'], 'coordinator_address'),
    (['--coordinator_address', 'localhost', '--num_processes', '2', '--process_id', '0'], 'coordinator_address'),
    (['--coordinator_address', 'localhost:1234', '--num_processes', '2', '--process_id', '2'], 'process_id'),
])
def test_inconsistent_multihost_settings(flags, key):
  values = dict(zip(flags[::2], flags[1::2]))
  with pytest.raises(ConfigError, match=f'^{key}='):
    distributed.settings_from(values.get('--coordinator_address'), values.get('--num_processes'),
                              values.get('--process_id'), environ={})
