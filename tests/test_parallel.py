"""Data parallelism: pmap and shard_map on 8 fake CPU devices, and two jax.distributed processes with 2 devices
each, reproduce the single-device run; checkpoints move between device counts; gradient accumulation equals the
large batch; the train step compiles once.

The multi-device runs are subprocesses of the real CLI (XLA_FLAGS must be set before JAX starts); the 1-device
reference runs in this process. Every run reads the data as 2 shards (data.num_shards=2), so one process and two
processes see the same global batches. Tolerance: 1e-5 relative on every logged loss, and 1e-5 relative L2 distance
‖a − b‖/‖b‖ over all parameters (EMA and optimizer state too). Elementwise comparison is the wrong yardstick:
parameters whose true gradient is exactly zero (an attention key bias, a bias right before a GroupNorm) receive
pure rounding noise, which Adam scales to ±lr whatever its size, so they differ across device counts.
"""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import data, methods, parallel, schedules, train
from ddjax.methods import diffusion as diffusion_method
from ddjax.models import create_model
from ddjax.validation import ConfigError
from ddjax.tools.benchmark import compilations
from tests.tiny import logged, restore_state, run_main, run_processes, tiny_config

STEPS = 20
RUN = {'train.num_steps': STEPS, 'train.log_every': 1, 'train.checkpoint_every': 10, 'train.sample_every': 0,
       'data.num_shards': 2}
RTOL = 1e-5


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """1 device: 20 steps (checkpoints 10, 20), then resumed to 24 in the same workdir."""
  workdir = tmp_path_factory.mktemp('one_device')
  train.train_and_evaluate(tiny_config(data_dir, **RUN), str(workdir))
  final = train.train_and_evaluate(tiny_config(data_dir, **{**RUN, 'train.num_steps': 24}), str(workdir))
  return workdir, final


def relative_distance(got, want) -> float:
  """‖got − want‖ / ‖want‖ over every float leaf, in float64."""
  pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
           for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)) if np.asarray(b).dtype.kind == 'f']
  return float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in pairs) / sum((b ** 2).sum() for _, b in pairs)))


def assert_close_states(got, want, rtol=RTOL):
  for part in ('params', 'ema_params', 'opt_state'):
    distance = relative_distance(getattr(got, part), getattr(want, part))
    print(f'{part}: relative L2 distance {distance:.2e}')
    assert distance < rtol, part
  assert int(got.step) == int(want.step)


@pytest.fixture(scope='module', params=['pmap', 'shard_map'])
def eight_devices(request, data_dir, tmp_path_factory):
  """(mode, workdir) of a 20-step run on 8 fake devices, through the CLI."""
  workdir = tmp_path_factory.mktemp(f'eight_{request.param}')
  result = run_main(workdir, data_dir, devices=8, **{**RUN, 'parallel.mode': request.param})
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'8 devices (cpu, {request.param})' in result.stdout
  return request.param, workdir


def test_eight_devices_match_one(eight_devices, reference, data_dir):
  _, workdir = eight_devices
  losses, want = logged(workdir), logged(reference[0])
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)], [want[s] for s in range(1, STEPS + 1)],
                             rtol=RTOL)
  config = tiny_config(data_dir, **RUN)
  assert_close_states(restore_state(workdir, config, STEPS), restore_state(reference[0], config, STEPS))


def test_checkpoint_moves_from_eight_devices_to_one(eight_devices, reference, data_dir, tmp_path):
  _, workdir = eight_devices
  shutil.copytree(workdir / 'checkpoints' / str(STEPS), tmp_path / 'checkpoints' / str(STEPS))
  resumed = train.train_and_evaluate(tiny_config(data_dir, **{**RUN, 'train.num_steps': 24}), str(tmp_path))
  assert_close_states(resumed, reference[1])


def test_two_processes_resume_a_one_device_checkpoint_and_match_one(reference, data_dir, tmp_path):
  """Two jax.distributed processes resume the 1-device run's checkpoint 10 (process 0 picks the step, every
  process restores it) and continue to 20 as the 1-device run did: a checkpoint moves from 1 device to 4."""
  workdir, _ = reference
  shutil.copytree(workdir / 'checkpoints' / '10', tmp_path / 'checkpoints' / '10')
  shutil.copy(workdir / 'config.json', tmp_path / 'config.json')
  result = run_processes(2, 2, tmp_path, data_dir, **{**RUN, 'parallel.mode': 'shard_map', 'train.sample_every': 10})
  assert result.returncode == 0, result.stderr[-3000:]
  assert '4 devices (cpu, shard_map)' in result.stdout and 'at step 10' in result.stdout
  # Only process 0 writes: one line per step, one event file, one grid per sampling step.
  losses, want = logged(tmp_path), logged(workdir)
  assert len(open(tmp_path / 'metrics.jsonl').readlines()) == STEPS - 10
  np.testing.assert_allclose([losses[s] for s in range(11, STEPS + 1)], [want[s] for s in range(11, STEPS + 1)],
                             rtol=RTOL)
  assert len([f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]) == 1
  assert sorted(os.listdir(tmp_path / 'samples')) == ['step_0000020.png']
  config = tiny_config(data_dir, **RUN)
  assert_close_states(restore_state(tmp_path, config, STEPS), restore_state(workdir, config, STEPS))


# ---------------------------------------------------------------------------------------------------------------
# In-process, one device: the step function itself
# ---------------------------------------------------------------------------------------------------------------

def _step_fn(config, model, tx, schedule, *, accum=1):
  return functools.partial(
      diffusion_method.train_step, model=model, tx=tx, schedule=schedule, prediction='eps', variance='learned_range',
      loss='hybrid', hybrid_lambda=0.001, num_classes=config.data.num_classes, p_uncond=0.2,
      ema_decay=0.999, grad_accum_steps=accum)


@pytest.fixture(scope='module')
def setup(data_dir):
  config = tiny_config(data_dir)
  model = create_model(config)
  tx = diffusion_method.make_optimizer(config.train)
  state = methods.build(config).initial_state()
  schedule = schedules.make_schedule(schedules.get_betas('cosine', 50))
  batches = data.create_dataset(config)
  return config, model, tx, state, schedule, [next(batches) for _ in range(3)]


@pytest.mark.parametrize('mode', ['pmap', 'shard_map'])
def test_train_step_compiles_once(mode, setup):
  config, model, tx, state, schedule, batches = setup
  mapper = parallel.DataParallel.create(mode)
  step_fn = mapper.map(_step_fn(config, model, tx, schedule))
  replicated = mapper.replicate(state)
  before = compilations()
  replicated, metrics = step_fn(replicated, mapper.shard_batch(batches[0]))
  first = compilations()
  for batch in batches[1:]:
    replicated, metrics = step_fn(replicated, mapper.shard_batch(batch))
  assert first > before and compilations() == first  # steps 2 and 3 reuse step 1's executable
  assert int(mapper.unreplicate(replicated.step)) == 3
  assert np.isfinite(mapper.unreplicate(metrics)['loss'])
  # One device here: the gradient mean is the identity, not an all-reduce that copies every gradient.
  assert jax.device_count() == 1
  assert 'all-reduce' not in step_fn.lower(replicated, mapper.shard_batch(batches[0])).compile().as_text()


def test_grad_accumulation_equals_full_batch(setup):
  config, model, tx, state, schedule, batches = setup
  full_state, full_metrics = jax.jit(_step_fn(config, model, tx, schedule))(state, batches[0])
  accum_state, accum_metrics = jax.jit(_step_fn(config, model, tx, schedule, accum=4))(state, batches[0])
  for key in ('loss', 'mse', 'vb', 'loss_q0', 'loss_q3'):
    np.testing.assert_allclose(accum_metrics[key], full_metrics[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(accum_metrics['grad_norm'], full_metrics['grad_norm'], rtol=1e-4)
  assert_close_states(accum_state, full_state)


def test_bfloat16_compute_keeps_float32_state(setup, data_dir):
  config, _, tx, state, schedule, batches = setup
  model = create_model(tiny_config(data_dir, **{'parallel.precision': 'bfloat16'}))
  step_fn = jax.jit(_step_fn(config, model, tx, schedule))
  for batch in batches:
    state, metrics = step_fn(state, batch)
  assert np.isfinite(float(metrics['loss']))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize('overrides, key', [
    ({'parallel.mode': 'pjit'}, 'parallel.mode'),
    ({'parallel.precision': 'float16'}, 'parallel.precision'),
    ({'train.grad_accum_steps': 3}, 'train.grad_accum_steps'),
    ({'train.grad_accum_steps': 0}, 'train.grad_accum_steps'),
])
def test_bad_parallel_settings(overrides, key):
  with pytest.raises(ConfigError, match=f'^{key}='):
    parallel.validate(tiny_config(None, **overrides))
