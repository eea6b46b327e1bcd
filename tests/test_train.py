"""End to end: train a tiny config, checkpoint, resume, sample; TFDS datasets through mock_data; bad input."""
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddjax import checkpoint, config as config_lib, generate, methods, train
from ddjax.methods import diffusion as diffusion_method
from ddjax.validation import ConfigError
from ddjax.tools.benchmark import compilations
from tests.tiny import REPO, tiny_config, xla_flags


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A 4-step run, then a resumed run to step 6, in one workdir."""
  workdir = str(tmp_path_factory.mktemp('run'))
  first = train.train_and_evaluate(tiny_config(data_dir), workdir)
  resumed = train.train_and_evaluate(tiny_config(data_dir, **{'train.num_steps': 6}), workdir)
  return workdir, first, resumed


def test_train_writes_metrics_checkpoints_samples(trained):
  workdir, first, resumed = trained
  assert int(first.step) == 4 and int(resumed.step) == 6
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records] == [2, 4, 6]
  for record in records:
    for key in ('loss', 'steps_per_sec', 'mse', 'vb', 'grad_norm', 'param_norm', 'loss_q0', 'loss_q3'):
      assert np.isfinite(record[key]), key
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [2, 4, 6]
  assert sorted(os.listdir(os.path.join(workdir, 'samples'))) == ['step_0000004.png', 'step_0000006.png']
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


def test_a_second_run_in_the_same_process_compiles_nothing(trained, data_dir, tmp_path):
  """train.programs: a run that differs from the previous one only in loop keys (here a resume to more steps)
  reuses its compiled init, train step and sampler."""
  shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
  train.train_and_evaluate(tiny_config(data_dir, **{'train.num_steps': 8}), str(tmp_path))  # other tests ran since
  before = compilations()
  state = train.train_and_evaluate(tiny_config(data_dir, **{'train.num_steps': 10, 'train.log_every': 1}),
                                   str(tmp_path))
  assert int(state.step) == 10 and compilations() == before
  assert sorted(os.listdir(tmp_path / 'samples'))[-2:] == ['step_0000008.png', 'step_0000010.png']


def test_checkpoint_restores_same_params(trained, data_dir):
  workdir, first, _ = trained
  config = tiny_config(data_dir)
  template = methods.build(config).initial_state()
  manager = checkpoint.create_manager(workdir, read_only=True)
  restored = checkpoint.restore(manager, template, step=4)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(first)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sample_mode_writes_adm_npz(trained, data_dir):
  workdir, _, _ = trained
  config = tiny_config(data_dir)
  config.sample.update(num_samples=20, batch_size=12, class_label=3, checkpoint_step=4)
  images, labels = generate.sample_and_save(config, workdir)
  path = os.path.join(workdir, 'samples', 'samples_20x8x8x1_step4.npz')
  saved = np.load(path)
  assert saved['arr_0'].shape == (20, 8, 8, 1) and saved['arr_0'].dtype == np.uint8
  np.testing.assert_array_equal(saved['arr_1'], 3)
  np.testing.assert_array_equal(saved['arr_0'], images)
  assert os.path.exists(path.replace('.npz', '.png'))
  config.sample.update(class_label=-1, checkpoint_step=None, sampler='ddpm', num_steps=None, step_size=10,
                       guidance=0.0)
  _, labels = generate.sample_and_save(config, workdir)
  assert labels.min() >= 0 and labels.max() < 10


@pytest.mark.parametrize('dataset, image_size, num_channels', [
    ('mnist', 8, 1), ('cifar10', 8, 3), ('imagenet_resized/64x64', 8, 3)])
def test_tfds_datasets_through_mock_data(dataset, image_size, num_channels, tmp_path):
  config = tiny_config(None, **{'data.dataset': dataset, 'data.num_channels': num_channels,
                                'data.image_size': image_size, 'train.num_steps': 2, 'train.sample_every': 0})
  config.data.num_classes = 10 if dataset != 'imagenet_resized/64x64' else 1000
  with tfds.testing.mock_data(num_examples=32):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize('overrides, key', [
    ({'model.blocks': 'res,bogus'}, 'model.blocks'),
    ({'data.image_size': 6, 'model.num_levels': 3}, 'data.image_size'),
    ({'data.num_classes': 0, 'sample.guidance': 1.0}, 'sample.guidance'),
    ({'diffusion.loss': 'simple'}, 'diffusion.loss'),
    ({'sample.step_size': 100}, 'sample.step_size'),
])
def test_bad_config_is_one_line(overrides, key):
  config = tiny_config(None, **overrides)
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value).startswith(key + '=') and '\n' not in str(error.value)


def run_cli(args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, '-m', 'ddjax.main', '--config', 'configs/digits.py', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_batch_not_divisible_by_devices_exits_2(tmp_path):
  result = run_cli(['--workdir', str(tmp_path), '--config.data.batch_size=12'],
                   {'XLA_FLAGS': xla_flags(8)})
  assert result.returncode == 2
  message = [line for line in result.stderr.splitlines() if line.startswith('ddjax:')]
  assert message == ['ddjax: invalid config: data.batch_size=12 is invalid; allowed: a multiple of the global '
                     'device count 8']
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_workdir_keeps_its_config_and_resume_refuses_structure_or_data_order_changes(trained, data_dir):
  workdir, _, _ = trained
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['model.ch'] == 16 and saved['train.num_steps'] == 4  # the start's, kept by the resume to 6
  steps_before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  changed = tiny_config(data_dir, **{'model.ch': 8, 'train.grad_clip': 0.0, 'data.batch_size': 8,
                                     'train.num_steps': 8, 'sample.guidance': 2.0})
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(changed, workdir)
  message = str(error.value)
  assert '\n' not in message
  for named in ('data.batch_size 16 -> 8', 'model.ch 16 -> 8', 'train.grad_clip 1.0 -> 0.0'):
    assert named in message, message
  assert 'num_steps' not in message and 'guidance' not in message
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == steps_before
  assert not os.path.exists(os.path.join(workdir, 'checkpoints.corrupt'))
  # Changes that leave the state and the data order alone are reported, not refused.
  safe = tiny_config(data_dir, **{'train.num_steps': 8, 'sample.guidance': 2.0, 'train.learning_rate': 5e-4})
  lines = train.check_resume_config(safe, saved, methods.abstract_state)
  assert lines == ['sample.guidance: 1.0 -> 2.0', 'train.learning_rate: 0.001 -> 0.0005', 'train.num_steps: 4 -> 8']


def test_storage_errors_are_retried_and_never_move_a_checkpoint(trained, data_dir, monkeypatch):
  workdir, _, resumed = trained
  config = tiny_config(data_dir)
  template = methods.abstract_state(config)
  manager = checkpoint.create_manager(workdir, read_only=True)
  real_restore, failures = manager.restore, []

  def flaky_restore(step, *args, **kwargs):
    if len(failures) < budget[0]:
      failures.append(step)
      raise OSError(errno.EIO, os.strerror(errno.EIO))
    return real_restore(step, *args, **kwargs)

  monkeypatch.setattr(manager, 'restore', flaky_restore)
  monkeypatch.setattr(checkpoint.time, 'sleep', lambda seconds: None)
  budget = [checkpoint.READ_ATTEMPTS - 1]  # transient: the last attempt reads it
  state = checkpoint.resume(manager, template, warn=print)
  assert failures == [6] * (checkpoint.READ_ATTEMPTS - 1) and int(state.step) == 6
  np.testing.assert_array_equal(jax.tree.leaves(state.params)[0], jax.tree.leaves(resumed.params)[0])
  budget[0] = 10 ** 6  # persistent: one line, and the checkpoint stays where it is
  with pytest.raises(checkpoint.CheckpointReadError) as error:
    checkpoint.resume(manager, template, warn=print)
  assert 'nothing was moved' in str(error.value) and '\n' not in str(error.value)
  assert '6' in os.listdir(os.path.join(workdir, 'checkpoints'))
  assert not os.path.exists(os.path.join(workdir, 'checkpoints.corrupt'))


def test_first_update_moves_and_the_logged_rate_is_the_one_used():
  config = tiny_config(None)
  for warmup, rates in ((0, [1e-3, 1e-3]), (4, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])):
    config.train.warmup_steps = warmup
    schedule = diffusion_method.learning_rate_schedule(config.train)
    np.testing.assert_allclose([float(schedule(n)) for n in range(len(rates))], rates, rtol=1e-6)
  config.train.update(warmup_steps=0, grad_clip=0.0)
  tx = diffusion_method.make_optimizer(config.train)
  params = {'w': jnp.ones(3)}
  updates, _ = tx.update({'w': jnp.array([1.0, -2.0, 0.5])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-1e-3, 1e-3, -1e-3], rtol=1e-4)  # Adam's first step: ±lr


def test_grids_are_at_most_16_columns():
  for classes, samples, columns in ((10, 100, 10), (1000, 100, 16), (0, 100, 10), (0, 1000, 16)):
    config = tiny_config(None, **{'data.num_classes': classes, 'sample.num_samples': samples})
    assert generate.grid_columns(config) == columns
