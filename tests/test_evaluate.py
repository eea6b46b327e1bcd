"""`--mode eval` end to end on a tiny trained workdir with random Inception weights: the plumbing (samples npz,
metrics.jsonl with fid, is and bpd), not the values; the reference statistics computed first and cached with
their provenance; an interrupted eval resumed from its saved chunks; a missing weights file is one line and exit
status 1."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ddjax import checkpoint, generate, image_files, methods, parallel
from ddjax.evaluation import evaluate, fid
from ddjax.validation import ConfigError
from tests.test_fid import FEATURE_BATCH, OFFLINE, fake_inception, random_state_dict, save_torch
from tests.tiny import main_args, run_main_in_process, tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A workdir with a step-4 checkpoint of the tiny config: its initial state, saved as training saves it
  (compiling a train step would cost more than the rest of this file)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(data_dir)
  state = methods.build(config).initial_state()
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
  image_files.save_npz(reference, fid.statistics(features, rng.normal(size=(64, 1008)), source='random'))
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
  [chunks] = [name for name in os.listdir(os.path.join(trained, 'samples')) if name.startswith('eval_chunks_step4_')]
  [chunk] = os.listdir(os.path.join(trained, 'samples', chunks))  # 16 samples: one chunk of 5000 or fewer
  assert chunk == 'chunk00000_16.npz'
  np.testing.assert_array_equal(np.load(os.path.join(trained, 'samples', chunks, chunk))['arr_0'], saved['arr_0'])


@pytest.mark.parametrize('reference', ['holdout', 'validation', 'missing.npz'])  # digits has train and test
def test_eval_reference_is_checked_first(trained, data_dir, eval_files, reference):
  weights, _ = eval_files
  with pytest.raises(ConfigError, match='eval.reference'):
    evaluate.evaluate(eval_config(data_dir, weights, reference), trained)


def test_missing_weights_is_one_line_and_exit_1(trained, data_dir, tmp_path, monkeypatch):
  home = tmp_path / 'home'
  home.mkdir()
  for name, value in {'HOME': str(home), **OFFLINE}.items():
    monkeypatch.setenv(name, value)
  result = run_main_in_process([*main_args(trained, data_dir), '--mode', 'eval', '--config.eval.metrics=inception'])
  assert result.returncode == 1, result.stderr
  # The last line, and the only one of ddjax.
  errors = [line for line in result.stderr.splitlines() if line.startswith('ddjax: ')]
  assert errors == result.stderr.strip().splitlines()[-1:] and 'Traceback' not in result.stderr, result.stderr
  assert fid.WEIGHTS_URL in errors[0] and str(home / '.cache' / 'ddjax' / fid.WEIGHTS_FILE) in errors[0]


class Interrupted(Exception):
  """Stands for the eval being killed."""


@pytest.fixture
def recorded(monkeypatch):
  """The cheap stand-in Inception (16-d features, so the Fréchet distance is instant; its weights not even read)
  and a log of the calls that cost: ('stats', source) for each fid.stats_of, ('generate', n) for each chunk
  drawn. `recorded.fail_at = k` raises Interrupted at the k-th draw (1-based) of the next run."""
  monkeypatch.setattr(fid, 'make_feature_fn', fake_inception(num_features=16, num_logits=10))
  monkeypatch.setattr(fid, 'load_variables', lambda path: None)
  calls = []
  stats_of, generate_images = fid.stats_of, generate.generate_images

  def counted_stats(batches, variables, **kwargs):
    calls.append(('stats', kwargs['source']))
    return stats_of(batches, variables, **kwargs)

  def counted_generate(*args, num_samples, **kwargs):
    calls.append(('generate', num_samples))
    if sum(call[0] == 'generate' for call in calls) == getattr(recorded, 'fail_at', None):
      raise Interrupted
    return generate_images(*args, num_samples=num_samples, **kwargs)

  monkeypatch.setattr(fid, 'stats_of', counted_stats)
  monkeypatch.setattr(generate, 'generate_images', counted_generate)
  monkeypatch.setattr(evaluate, 'CHUNK_SAMPLES', 16)  # one sample batch: 40 samples are chunks of 16, 16, 8

  def recorded():
    taken = calls[:]
    calls.clear()
    recorded.fail_at = None
    return taken

  return recorded


def run_eval(config, workdir):
  """(result, the npz samples) of an eval."""
  result = evaluate.evaluate(config, str(workdir))
  with np.load(os.path.join(workdir, 'samples', 'eval_40x8x8x1_step4.npz')) as saved:
    return result, saved['arr_0'], saved['arr_1']


def test_eval_computes_the_reference_first_and_resumes_from_saved_chunks(trained, data_dir, eval_files, recorded,
                                                                          tmp_path):
  weights, _ = eval_files
  overrides = {'eval.num_samples': 40, 'eval.bpd_examples': 0, 'eval.cache_dir': str(tmp_path / 'cache')}
  config = eval_config(data_dir, weights, 'test', **overrides)
  resumed, straight = (shutil.copytree(os.path.join(trained, 'checkpoints'), tmp_path / name / 'checkpoints').parent
                       for name in ('resumed', 'straight'))
  reference = ('stats', 'tfds:digits/test')

  # Killed while drawing the third chunk: the reference came first (in the shared cache dir, not the workdir),
  # the two chunks drawn before are saved; no samples npz, no metrics.
  recorded.fail_at = 3
  with pytest.raises(Interrupted):
    evaluate.evaluate(config, str(resumed))
  assert recorded() == [reference, ('generate', 16), ('generate', 16), ('generate', 8)]
  [cached] = os.listdir(tmp_path / 'cache')
  assert cached.startswith('reference_digits_test_8x8x1_n359_') and cached.endswith('.npz')
  [chunks] = [name for name in os.listdir(resumed / 'samples') if name.startswith('eval_chunks_step4_')]
  assert sorted(os.listdir(resumed / 'samples' / chunks)) == ['chunk00000_16.npz', 'chunk00001_16.npz']
  assert sorted(os.listdir(resumed / 'samples')) == [chunks] and not (resumed / 'metrics.jsonl').exists()

  # Run again: the cached reference and the two saved chunks are read, only the third chunk is drawn.
  result, images, labels = run_eval(config, resumed)
  assert recorded() == [('generate', 8), ('stats', str(resumed / 'samples' / 'eval_40x8x8x1_step4.npz'))]
  # The same as an eval never interrupted (in another workdir, with the reference from the cache).
  want, want_images, want_labels = run_eval(config, straight)
  assert recorded() == [('generate', 16), ('generate', 16), ('generate', 8),
                        ('stats', str(straight / 'samples' / 'eval_40x8x8x1_step4.npz'))]
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)
  assert result == want and np.isfinite(result['fid']) and result['fid'] > 0
  # Each chunk has its own noise and labels.
  assert not np.array_equal(images[:16], images[16:32]) and not np.array_equal(labels[:16], labels[16:32])

  # Changed sampler settings never reuse chunks: the first chunk is drawn again.
  recorded.fail_at = 1
  with pytest.raises(Interrupted):
    evaluate.evaluate(eval_config(data_dir, weights, 'test', **overrides, **{'sample.eta': 0.5}), str(resumed))
  assert recorded() == [('generate', 16)]


def test_reference_split_stats_are_cached_with_their_provenance(eval_files, tmp_path, monkeypatch):
  """eval.reference='test': the split's statistics, resized as training data, computed once and then read from
  eval.cache_dir while their provenance (weights, size, data_dir, ...) is the same; never reused otherwise."""
  weights, _ = eval_files
  config = eval_config(None, weights, 'test', **{'data.dataset': 'mnist', 'eval.cache_dir': str(tmp_path)})
  variables, sha = fid.load_variables(weights), fid.sha256_of(weights)
  calls = []
  stats_of = fid.stats_of

  def counted(batches, inception_variables, **kwargs):
    batches = list(batches)
    calls.append([b.shape for b in batches])
    return stats_of(iter(batches), inception_variables, **kwargs)

  monkeypatch.setattr(fid, 'stats_of', counted)
  with tfds.testing.mock_data(num_examples=FEATURE_BATCH):
    first = evaluate.reference_stats(config, variables, mesh=mesh(), weights_sha256=sha)
    again = evaluate.reference_stats(config, variables, mesh=mesh(), weights_sha256=sha)
    assert calls == [[(FEATURE_BATCH, 8, 8, 1)]]  # 28×28 MNIST resized to the model's 8×8, computed once
    [name] = os.listdir(tmp_path)
    assert name.startswith('reference_mnist_test_8x8x1_n8_')
    cached = fid.load_stats(str(tmp_path / name))
    assert (cached['dataset'], cached['split'], cached['count'], cached['image_size'], cached['num_channels']) == (
        'mnist', 'test', 8, 8, 1)
    assert cached['weights_sha256'] == sha and cached['source'] == 'tfds:mnist/test' and 'is_mean' not in cached
    assert cached['data_dir'] == os.fspath(tfds.builder('mnist').data_dir_root)  # mock_data's, here
    np.testing.assert_array_equal(again['sigma'], first['sigma'])
    # Other weights: another file. A file at the same name whose provenance differs: recomputed, not reused.
    evaluate.reference_stats(config, variables, mesh=mesh(), weights_sha256='0' * 64)
    assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2
    image_files.save_npz(str(tmp_path / name), {**cached, 'data_dir': '/elsewhere', 'mu': cached['mu'] + 1})
    recomputed = evaluate.reference_stats(config, variables, mesh=mesh(), weights_sha256=sha)
    assert len(calls) == 3
    np.testing.assert_array_equal(recomputed['mu'], first['mu'])
    assert fid.load_stats(str(tmp_path / name))['data_dir'] == cached['data_dir']


def test_nll_batch_follows_bpd_examples():
  """The NLL batch: eval.bpd_examples evened out over the fewest batches of at most data.batch_size, rounded up
  to the device count, instead of data.batch_size (1024 on ImageNet) padded."""
  assert evaluate.nll_batch_size(256, max_batch=1024, devices=8) == 256
  assert evaluate.nll_batch_size(5, max_batch=16, devices=8) == 8
  assert evaluate.nll_batch_size(2000, max_batch=1024, devices=8) == 1000  # 2 batches, not 1024 + 976 padded
  assert evaluate.nll_batch_size(1025, max_batch=1024, devices=8) == 520


def mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
