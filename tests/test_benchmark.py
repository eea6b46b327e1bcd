"""python -m ddjax.benchmark: the JSON line's keys and sanity on the tiny config, and no recompilation once timing."""
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ddjax import benchmark
from tests.tiny import REPO, TINY, tiny_config

COMMON = {'what', 'images_per_sec', 'ms_per_step', 'compile_s', 'param_count', 'peak_host_memory_bytes',
          'peak_device_memory_bytes', 'device_kind', 'device_count', 'batch_size'}


def check_common(result, what, batch_size):
  assert result['what'] == what and result['batch_size'] == batch_size and result['device_count'] >= 1
  for key in ('images_per_sec', 'ms_per_step', 'param_count', 'peak_host_memory_bytes'):
    assert result[key] > 0, key
  assert result['compile_s'] >= 0 and isinstance(result['device_kind'], str)
  assert result['peak_device_memory_bytes'] is None or result['peak_device_memory_bytes'] > 0
  assert result['images_per_sec'] == pytest.approx(batch_size / result['ms_per_step'] * 1e3)


def test_train_over_the_real_pipeline(tmp_path):
  """The method's step over the digits pipeline; time_steps raises if a step after the first compiles."""
  result = benchmark.train(tiny_config(str(tmp_path)), warmup=1, steps=10, synthetic=False)
  assert set(result) == COMMON | {'flops_per_step', 'data_wait_fraction'}
  check_common(result, 'train', TINY['data.batch_size'])
  assert result['flops_per_step'] > 0 and 0 <= result['data_wait_fraction'] < 1


def test_sample_cli_prints_json_last(tmp_path):
  flags = [f'--config.{key}={value}' for key, value in TINY.items()]
  completed = subprocess.run(
      [sys.executable, '-m', 'ddjax.benchmark', '--config', 'configs/digits.py', '--what', 'sample', '--steps', '10',
       '--warmup', '1', f'--config.data.data_dir={tmp_path}', *flags],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert set(result) == COMMON | {'ms_per_network_eval', 'overhead_ratio'}
  check_common(result, 'sample', TINY['sample.batch_size'])
  assert result['ms_per_network_eval'] > 0 and math.isfinite(result['overhead_ratio'])
  assert result['overhead_ratio'] > 0.5  # 5 guided steps cannot cost less than ~5 unguided forwards
  assert '[benchmark]' in completed.stderr and '[benchmark]' not in completed.stdout


def test_time_steps_rejects_a_step_that_recompiles():
  shapes = iter(range(1, 100))
  square = jax.jit(lambda x: x * x)
  with pytest.raises(RuntimeError, match='compilation'):
    benchmark.time_steps(lambda: jnp.ones(next(shapes)), square, warmup=1, steps=2)
  timings = benchmark.time_steps(lambda: jnp.ones(3), square, warmup=1, steps=3)
  assert len(timings.step_s) == 3 and timings.compile_s >= 0 and 0 <= timings.wait_fraction <= 1
