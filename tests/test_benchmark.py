"""python -m ddjax.benchmark: the JSON line's keys and sanity on the tiny config, and no recompilation once timing."""
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ddjax.tools import benchmark
from tests.tiny import REPO, TINY, tiny_config

COMMON = {'what', 'images_per_sec', 'ms_per_step', 'compile_s', 'param_count', 'peak_host_memory_bytes',
          'peak_device_memory_bytes', 'device_memory_limit_bytes', 'device_kind', 'device_count', 'batch_size'}


def check_common(result, what, batch_size):
  assert result['what'] == what and result['batch_size'] == batch_size and result['device_count'] >= 1
  for key in ('images_per_sec', 'ms_per_step', 'param_count', 'peak_host_memory_bytes'):
    assert result[key] > 0, key
  assert result['compile_s'] >= 0 and isinstance(result['device_kind'], str)
  for key in ('peak_device_memory_bytes', 'device_memory_limit_bytes'):
    assert result[key] is None or result[key] > 0, key
  assert result['images_per_sec'] == pytest.approx(batch_size / result['ms_per_step'] * 1e3)


def test_train_over_the_real_pipeline(tmp_path):
  """The method's step over the digits pipeline; time_steps raises if a step after the first compiles. Then
  where two more steps' time went: the U-Net's layers, both passes, the optimizer's and the EMA's scopes."""
  result = benchmark.train(tiny_config(str(tmp_path)), warmup=1, steps=10, synthetic=False,
                           profile=benchmark.Profile(2))
  assert set(result) == COMMON | {'flops_per_step', 'data_wait_fraction', 'profile'}
  check_common(result, 'train', TINY['data.batch_size'])
  assert result['flops_per_step'] > 0 and 0 <= result['data_wait_fraction'] < 1
  profile = result['profile']
  assert {'forward', 'backward', 'optimizer', 'ema'} <= set(profile['by_phase'])
  assert {'Conv', 'GroupNorm', 'Dense'} <= set(profile['by_layer']) and profile['by_kind']['convolution'] > 0
  assert sum(profile['by_layer'].values()) == pytest.approx(profile['busy_ms'])
  assert 0 < profile['busy_ms'] <= 1.01 * profile['wall_ms']


def test_train_over_the_pipeline_on_mock_images_of_an_unprepared_dataset():
  """--data=mock: cifar10 is not prepared here; the same pipeline reads tfds.testing.mock_data's random images."""
  config = tiny_config(None, **{'data.dataset': 'cifar10', 'data.num_channels': 3, 'data.num_classes': 10})
  with benchmark.mock_dataset():
    result = benchmark.train(config, warmup=0, steps=3, synthetic=False)
  check_common(result, 'train', TINY['data.batch_size'])
  assert 0 <= result['data_wait_fraction'] < 1


def test_sample_cli_prints_json_last(tmp_path):
  flags = [f'--config.{key}={value}' for key, value in TINY.items()]
  completed = subprocess.run(
      [sys.executable, '-m', 'ddjax.benchmark', '--config', 'configs/digits.py', '--what', 'sample', '--steps', '10',
       '--warmup', '1', '--profile', '1', f'--config.data.data_dir={tmp_path}', *flags],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert set(result) == COMMON | {'ms_per_network_eval', 'overhead_ratio', 'profile'}
  assert result['profile']['by_phase']['forward'] > 0  # the sampler's scan body: the U-Net's forward
  check_common(result, 'sample', TINY['sample.batch_size'])
  assert result['ms_per_network_eval'] > 0 and math.isfinite(result['overhead_ratio'])
  assert result['overhead_ratio'] > 0.5  # 5 guided steps cannot cost less than ~5 guided forwards
  assert '[benchmark]' in completed.stderr and '[benchmark]' not in completed.stdout
  assert 'phase | layer | kind | ms | share | ops' in completed.stderr


def test_time_steps_rejects_a_step_that_recompiles():
  shapes = iter(range(1, 100))
  square = jax.jit(lambda x: x * x)
  with pytest.raises(RuntimeError, match='compilation'):
    benchmark.time_steps(lambda: jnp.ones(next(shapes)), square, warmup=1, steps=2)
  timings = benchmark.time_steps(lambda: jnp.ones(3), square, warmup=1, steps=3)
  assert len(timings.step_s) == 3 and timings.compile_s >= 0 and 0 <= timings.wait_fraction <= 1


def test_time_alternating_interleaves_the_programs():
  """A sampler and its bare forward are timed in alternation (one call of each per step), each program's own
  timings kept apart."""
  calls = []
  programs = [(lambda name=name: name, lambda name: calls.append(name) or jnp.ones(2)) for name in 'ab']
  first, second = benchmark.time_alternating(programs, warmup=1, steps=3)
  assert calls == list('ab' * 5)
  assert len(first.step_s) == len(second.step_s) == 3 and first.first_s > 0 and second.first_s > 0


def test_flops_count_convolutions_in_closed_form():
  """flops_of counts the program before optimisation, lowered for the CPU on every backend (a GPU's compiled
  program counts cuDNN's convolutions as nothing): a 3x3 SAME convolution is 2 * N * C_in * C_out * (the valid
  taps over the H x W outputs: (3H - 2) * (3W - 2)), in float32 and bfloat16, and its two gradients twice that."""
  n, size, c_in, c_out = 4, 8, 16, 32
  image = jax.ShapeDtypeStruct((n, size, size, c_in), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 3, c_in, c_out), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = 2 * n * c_in * c_out * (3 * size - 2) ** 2
  assert benchmark.flops_of(conv, image, kernel) == expected
  assert benchmark.flops_of(conv, *[a.update(dtype=jnp.bfloat16) for a in (image, kernel)]) == expected
  gradients = jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))
  assert benchmark.flops_of(gradients, image, kernel) == 2 * expected


def test_gpu_table_peak_rates_and_mfu(monkeypatch):
  """benchmarks/gpu.py: the datasheet peak matched by device_kind, MFU from the cost-analysis FLOPs, a failed
  attempt kept as a row (the GPU run itself needs a GPU; GPU_SH_SMOKE=1 runs it on the CPU)."""
  from benchmarks import gpu
  monkeypatch.delenv('GPU_SH_PEAK_TFLOPS', raising=False)
  kinds = {'NVIDIA H100 80GB HBM3': 989, 'NVIDIA H100 PCIe': 756, 'NVIDIA H200': 989, 'NVIDIA GH200 480GB': 989,
           'NVIDIA A100-SXM4-80GB': 312, 'NVIDIA A10': 125, 'NVIDIA A10G': None, 'NVIDIA L4': 121,
           'NVIDIA L40S': 362, 'cpu': None}
  assert {kind: gpu.peak_tflops(kind) for kind in kinds} == kinds
  result = {'device_kind': 'NVIDIA A100-SXM4-80GB', 'flops_per_step': 156e12, 'ms_per_step': 1000.0,
            'batch_size': 128, 'images_per_sec': 128.0, 'compile_s': 40.0, 'peak_device_memory_bytes': 2**35}
  rows = [gpu.row('train 128', 'bf16', result), gpu.row('train largest (256)', 'bf16', 'out of memory')]
  assert rows[0]['mfu'] == pytest.approx(0.5)
  table = gpu.format_table(rows)
  assert '| 128 | 128.0 | 1000.0 | 40 | 156 | 50.0% | 32.0' in table and 'failed: out of memory' in table
  monkeypatch.setenv('GPU_SH_PEAK_TFLOPS', '100')
  assert gpu.peak_tflops('cpu') == 100


def test_gpu_script_searches_batches_until_one_fails(monkeypatch, capsys):
  from benchmarks import gpu
  calls = []

  def fake_benchmark(args, *, timeout_s, formulation=None):
    flags = dict(arg.split('=', 1) for arg in args if arg.startswith('--config.') and '=' in arg)
    batch = int(flags.get('--config.data.batch_size', 8))
    calls.append((args[args.index('--what') + 1], batch) + ((formulation,) if formulation else ()))
    if batch > 256:
      return 'out of memory'
    profiled = '--profile' in args and args[args.index('--profile') + 1] != '0'
    profile = {'wall_ms': 12.0, 'busy_ms': 10.0, 'span_ms': 10.0, 'by_kind': {'convolution': 10.0},
               'by_phase': {'backward': 10.0}, 'by_layer': {'Conv': 10.0},
               'top': [['backward', 'Conv', 'convolution', 10.0, 2.0]], 'lines': {'/device:GPU:0 Stream #7': 6}}
    return {'device_kind': 'NVIDIA H100 80GB HBM3', 'flops_per_step': 1e12 * batch, 'ms_per_step': 10.0 * batch,
            'batch_size': batch, 'images_per_sec': 100.0, 'compile_s': 1.0, 'peak_device_memory_bytes': None,
            'ms_per_network_eval': 1.0, 'overhead_ratio': 2.0, **({'profile': profile} if profiled else {})}
  monkeypatch.setattr(gpu, 'benchmark', fake_benchmark)
  monkeypatch.delenv('GPU_SH_SMOKE', raising=False)
  gpu.main()
  assert calls == [('train', 128, 'plain'), ('train', 128), ('train', 128, 'xla_cpu'), ('sample', 8), ('fid', 8),
                   ('train', 256), ('train', 384), ('train', 256), ('train', 384)]
  table = capsys.readouterr().out
  assert 'faster formulation of the train step here: plain (plain 1280.0 ms/step, xla_cpu 1280.0 ms/step' in table
  assert 'device: NVIDIA H100 80GB HBM3; MFU against 989 TFLOP/s' in table
  assert table.count('train largest (256; 384: out of memory)') == 2 and '10.1%' in table  # 1e12 / 10 ms / 989e12
  assert table.count('where the time of') == 1 and 'where the time of train 128 plain bf16 goes' in table  # bf16 only
  assert 'backward | Conv | convolution | 10.00 | 100.0% | 2' in table
  assert "convolutions' time: 12800 TFLOP/s" in table  # 128e12 FLOPs / 10 ms (a fake device)


def test_gpu_script_jumps_to_the_batch_its_memory_predicts(monkeypatch, capsys):
  """Where the backend reports memory: the batch that step 1's peak, scaled linearly, puts at 90% of the limit
  (a multiple of 64), then a quarter less after an attempt that runs out of memory."""
  from benchmarks import gpu
  calls, limit = [], 100e9
  per_image = {'bfloat16': 80e6, 'float32': 160e6}

  def fake_benchmark(args, *, timeout_s, formulation=None):
    flags = dict(arg.split('=', 1) for arg in args if arg.startswith('--config.') and '=' in arg)
    batch, precision = int(flags.get('--config.data.batch_size', 8)), flags.get('--config.parallel.precision')
    calls.append((args[args.index('--what') + 1], batch))
    if batch > 1000:
      return 'out of memory'
    return {'device_kind': 'NVIDIA H200', 'flops_per_step': 1e12 * batch, 'ms_per_step': 10.0 * batch,
            'batch_size': batch, 'images_per_sec': 100.0, 'compile_s': 1.0,
            'peak_device_memory_bytes': per_image.get(precision, 1e6) * batch, 'device_memory_limit_bytes': limit,
            'ms_per_network_eval': 1.0, 'overhead_ratio': 2.0}
  monkeypatch.setattr(gpu, 'benchmark', fake_benchmark)
  monkeypatch.delenv('GPU_SH_SMOKE', raising=False)
  first = {'peak_device_memory_bytes': 80e6 * 128, 'device_memory_limit_bytes': limit}
  assert gpu.largest_batch_guess(first, 128) == 1088  # 0.9 * 100e9 / 80e6 = 1125
  assert gpu.largest_batch_guess({'peak_device_memory_bytes': None, 'device_memory_limit_bytes': None}, 8) is None
  gpu.main()
  assert calls == [('train', 128), ('train', 128), ('train', 128), ('sample', 8), ('fid', 8), ('train', 1088),
                   ('train', 768), ('train', 512)]  # 1088 * 3 / 4 = 816 -> 768; float32: 0.9 * 100e9 / 160e6 = 562 -> 512
  table = capsys.readouterr().out
  assert 'train largest (768; 1088: out of memory) | bf16 | 768 |' in table
  assert 'train largest (512) | f32 | 512 |' in table
