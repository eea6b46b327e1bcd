"""`--mode eval` end to end on a tiny trained workdir with random Inception weights: the plumbing (samples npz,
metrics.jsonl with fid, is and bpd), not the values; a missing weights file is one line and exit status 1."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddjax import checkpoint, evaluate, fid, parallel, train
from ddjax.models import create_model
from ddjax.validation import ConfigError
from tests.test_fid import FEATURE_BATCH, OFFLINE, random_state_dict, save_torch
from tests.tiny import run_main, tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A workdir with a step-4 checkpoint of the tiny config: its initial state, saved as training saves it
  (compiling a train step would cost more than the rest of this file)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(data_dir)
  state = train.create_train_state(config, create_model(config), train.make_optimizer(config.train))
  manager = checkpoint.create_manager(workdir)
  checkpoint.save(manager, 4, state.replace(step=jnp.int32(4)))
  checkpoint.wait(manager)
  return workdir


@pytest.fixture(scope='module')
def eval_files(tmp_path_factory):
  """(random weights in the legacy torch format, a 2048-d reference stats file)."""
  directory = tmp_path_factory.mktemp('eval')
  weights, reference = str(directory / 'inception.pth'), str(directory / 'reference.npz')
  save_torch(weights, random_state_dict(seed=1), legacy=True)
  rng = np.random.default_rng(0)
  features = rng.normal(size=(64, 2048))
  fid.save_stats(reference, fid.statistics(features, rng.normal(size=(64, 1008)), source='random'))
  return weights, reference


def eval_config(data_dir, weights, reference, **overrides):
  return tiny_config(data_dir, **{'eval.num_samples': 16, 'eval.batch_size': FEATURE_BATCH,
                                  'eval.bpd_examples': 16, 'eval.inception_weights': weights,
                                  'eval.reference': reference, **overrides})


def test_eval_writes_samples_and_metrics(trained, data_dir, eval_files):
  weights, reference = eval_files
  result = evaluate.evaluate(eval_config(data_dir, weights, reference), trained)
  assert result['step'] == 4
  record = [json.loads(line) for line in open(os.path.join(trained, 'metrics.jsonl'))][-1]
  assert record['step'] == 4
  for key in ('fid', 'is', 'bpd'):
    assert np.isfinite(record[key]) and record[key] == pytest.approx(result[key]), key
  assert record['fid'] > 0 and 1 <= record['is'] <= 1008 and record['bpd'] > 0
  saved = np.load(os.path.join(trained, 'samples', 'eval_16x8x8x1_step4.npz'))
  assert saved['arr_0'].shape == (16, 8, 8, 1) and saved['arr_0'].dtype == np.uint8
  assert saved['arr_1'].shape == (16,)


@pytest.mark.parametrize('reference', ['holdout', 'validation', 'missing.npz'])  # digits has train and test
def test_eval_reference_is_checked_first(trained, data_dir, eval_files, reference):
  weights, _ = eval_files
  with pytest.raises(ConfigError, match='eval.reference'):
    evaluate.evaluate(eval_config(data_dir, weights, reference), trained)


def test_missing_weights_is_one_line_and_exit_1(trained, data_dir, tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  result = run_main(trained, data_dir, extra_args=['--mode', 'eval'], env={'HOME': str(home), **OFFLINE},
                    timeout=120)
  assert result.returncode == 1, result.stderr
  # The last line, and the only one of ddjax (TensorFlow may log its start-up before it).
  errors = [line for line in result.stderr.splitlines() if line.startswith('ddjax: ')]
  assert errors == result.stderr.strip().splitlines()[-1:] and 'Traceback' not in result.stderr, result.stderr
  assert fid.WEIGHTS_URL in errors[0] and str(home / '.cache' / 'ddjax' / fid.WEIGHTS_FILE) in errors[0]


def test_reference_split_stats_are_cached(eval_files, tmp_path):
  """eval.reference='test': the split's statistics, resized as training data, computed once and then read from
  <workdir>/reference_stats_<dataset>_<split>.npz while the weights and image size stay the same."""
  weights, _ = eval_files
  config = eval_config(None, weights, 'test', **{'data.dataset': 'mnist'})
  variables, sha = fid.load_variables(weights), fid.sha256_of(weights)
  calls = []

  def stats(batches, inception_variables, **provenance):
    batches = list(batches)
    calls.append([b.shape for b in batches])
    return fid.stats_of(iter(batches), inception_variables, weights_sha256=sha, mesh=mesh(),
                        batch_size=FEATURE_BATCH, **provenance)

  with tfds.testing.mock_data(num_examples=FEATURE_BATCH):
    first = evaluate.reference_stats(config, str(tmp_path), variables, stats=stats, weights_sha256=sha)
    again = evaluate.reference_stats(config, str(tmp_path), variables, stats=stats, weights_sha256=sha)
  assert calls == [[(FEATURE_BATCH, 8, 8, 1)]]  # 28×28 MNIST resized to the model's 8×8, computed once
  cached = fid.load_stats(str(tmp_path / 'reference_stats_mnist_test.npz'))
  assert (cached['dataset'], cached['split'], cached['count'], cached['image_size']) == ('mnist', 'test', 8, 8)
  assert cached['weights_sha256'] == sha and cached['source'] == 'tfds:mnist/test'
  np.testing.assert_array_equal(again['sigma'], first['sigma'])


def mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
