"""The offline metrics on the bundled digits: real held-out images score at the floor, copies of the training set,
one-class samples and degraded digits are each caught by their metric; the feature network is reproducible and
its cache keyed by provenance; precision / recall and the blocked distances against hand-computed answers."""
import json
import os
import runpy

import jax
import numpy as np
import pytest
import scipy.ndimage

from ddjax import image_files
from ddjax.evaluation import fid, offline_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = {'image_size': 8, 'num_channels': 1}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))  # digits is prepared there on first use


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('featurenet'))


@pytest.fixture(scope='module')
def net(data_dir, cache_dir):
  """The digits feature network with the default recipe, trained once for the module."""
  return offline_metrics.load_or_train('digits', data_dir=data_dir, cache_dir=cache_dir, **DIGITS)


@pytest.fixture(scope='module')
def real(data_dir, net):
  return offline_metrics.real_reference('digits', data_dir=data_dir, net=net, **DIGITS)


@pytest.fixture(scope='module')
def probe_scores(net, real):
  return offline_metrics.score(real.probe_images, real.probe_labels, net=net, real=real)


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# -- Real data, copies, collapse, degradation. -------------------------------------------------------------------

def test_classifier_accuracy_and_reference_sizes(net, real):
  assert net.accuracy >= 0.97  # measured 0.9833 (359 test images)
  assert net.provenance['train_count'] == 1438 and net.provenance['heldout_count'] == 359
  assert real.reference_features.shape == (180, offline_metrics.FEATURE_DIM)
  assert real.probe_images.shape == (179, 8, 8, 1) and real.train_images.shape == (1438, 8, 8, 1)


def test_real_heldout_images_score_at_the_floor(net, probe_scores):
  scores = probe_scores  # measured: fd 12.51, floor 13.09, precision 0.916, recall 0.928, agreement 0.989
  assert 0.7 * scores['fd_floor'] < scores['fd'] < 1.4 * scores['fd_floor']
  assert scores['precision'] > 0.85 and scores['recall'] > 0.85
  assert abs(scores['agreement'] - net.accuracy) < 0.03 and scores['classifier_accuracy'] == net.accuracy
  assert scores['confident_share'] > 0.9  # measured 0.950


def test_a_copy_of_the_training_set_is_flagged(net, real, probe_scores):
  rows = np.random.default_rng(1).choice(len(real.train_images), len(real.probe_images), replace=False)
  copies = offline_metrics.score(real.train_images[rows], None, net=net, real=real)
  assert copies['memorisation'] == 0.0 and copies['copy_share'] == 1.0  # exact: float64 distances of copies are 0
  assert 0.8 < probe_scores['memorisation'] < 1.25 and probe_scores['copy_share'] < 0.03  # measured 0.983, 0.006
  assert 'agreement' not in copies and 'classifier_accuracy' not in copies


def test_mode_collapse_lowers_recall(net, real, probe_scores):
  threes = real.probe_images[real.probe_labels == 3]
  scores = offline_metrics.score(threes, np.full(len(threes), 3), net=net, real=real)
  assert scores['recall'] < 0.3 < probe_scores['recall']  # measured 0.178: the balls of 15 threes
  assert scores['precision'] > 0.9 and scores['fd'] > 5 * scores['fd_floor']
  histogram = offline_metrics.class_histogram(net.predict(threes), 10)
  np.testing.assert_array_equal(histogram, np.eye(10, dtype=int)[3] * len(threes))
  assert scores['rarest_class_share'] == 0.0 and 0.05 < probe_scores['rarest_class_share'] <= 0.1


def test_blurred_and_noised_digits_raise_fd_and_lower_precision(net, real, probe_scores):
  pixels = real.probe_images.astype(np.float64)
  blurred = scipy.ndimage.uniform_filter(pixels, size=(1, 3, 3, 1))  # a 3×3 box blur
  noised = pixels + np.random.default_rng(0).normal(0.0, 80.0, pixels.shape)
  quantise = lambda x: np.uint8(np.clip(np.round(x), 0, 255))
  blur = offline_metrics.score(quantise(blurred), None, net=net, real=real)
  noise = offline_metrics.score(quantise(noised), None, net=net, real=real)
  clean_fd, clean_precision = probe_scores['fd'], probe_scores['precision']
  assert blur['fd'] > 5 * clean_fd and blur['precision'] < 0.5  # measured fd 178.6, precision 0.29
  assert noise['fd'] > 2 * clean_fd and noise['precision'] < clean_precision - 0.05  # measured 43.4, 0.79


# -- The network and its cache. ----------------------------------------------------------------------------------

def test_feature_network_is_reproducible_and_cached(data_dir, tmp_path):
  train = lambda cache, **kw: offline_metrics.load_or_train('digits', data_dir=data_dir, cache_dir=str(cache),
                                                            epochs=1, **DIGITS, **kw)
  first, second = train(tmp_path / 'a'), train(tmp_path / 'b')
  assert leaves_equal(first.params, second.params) and first.accuracy == second.accuracy
  path = offline_metrics.cache_path(str(tmp_path / 'a'), first.provenance)
  assert os.listdir(tmp_path / 'a') == [os.path.basename(path)]

  # A file of the same provenance is reused as it is: zeroed params come back zero.
  with np.load(path) as saved:
    arrays = dict(saved)
  stored = json.loads(str(arrays['provenance']))
  zeroed = {name: np.zeros_like(value) if name.startswith('params/') else value for name, value in arrays.items()}
  image_files.save_npz(path, zeroed)
  reused = train(tmp_path / 'a')
  assert all(not leaf.any() for leaf in jax.tree.leaves(reused.params)) and reused.accuracy == first.accuracy

  # The same file claiming another seed is retrained (to the same params) and rewritten.
  image_files.save_npz(path, {**zeroed, 'provenance': json.dumps({**stored, 'seed': 1})})
  retrained = train(tmp_path / 'a')
  assert leaves_equal(retrained.params, first.params)
  with np.load(path) as saved:
    assert json.loads(str(saved['provenance'])) == stored

  other_seed = train(tmp_path / 'a', seed=1)
  assert other_seed.provenance['seed'] == 1 and not leaves_equal(other_seed.params, first.params)
  assert len(os.listdir(tmp_path / 'a')) == 2


def test_features_do_not_depend_on_the_batch_padding(net, real):
  images = real.train_images[:offline_metrics.EVAL_BATCH + 3]  # two batches, the second padded
  together = net.features(images)
  np.testing.assert_allclose(together[-3:], net.features(images[-3:]), rtol=1e-6, atol=1e-6)
  assert together.dtype == np.float64
  np.testing.assert_array_equal(net.predict(images), net.outputs(images)[1].argmax(axis=1))


# -- The math against hand-computed answers. ---------------------------------------------------------------------

def test_precision_recall_of_a_hand_made_point_set():
  real = np.array([[0, 0], [2, 0], [10, 0], [10, 3], [0, 30]], float)
  generated = np.array([[1, 1], [4.5, 0], [10, 1.5], [20, 0]], float)
  # k = 1 radii: real 2, 2, 3, 3, √829 (to (10, 3)); generated √13.25, √13.25, √32.5, √102.25.
  np.testing.assert_allclose(offline_metrics.knn_radii(real, k=1), [2, 2, 3, 3, np.sqrt(829)])
  np.testing.assert_allclose(offline_metrics.knn_radii(generated, k=1),
                             np.sqrt([13.25, 13.25, 32.5, 102.25]))
  # Inside a real ball: (1, 1) (√2 from (0, 0)), (10, 1.5); outside: (4.5, 0) (2.5 > 2 from (2, 0), 30.3 > 28.8
  # from (0, 30)), (20, 0). Covered by a generated ball: every real point but (0, 30) (29.0 > √13.25 from (1, 1)).
  assert offline_metrics.precision_recall(real, generated, k=1) == (0.5, 0.8)
  # k = 3: the third-nearest other point of (0, 0) is (10, 3), √109 away.
  assert offline_metrics.knn_radii(real, k=3)[0] == pytest.approx(np.sqrt(109))
  with pytest.raises(ValueError, match='more than 3 points'):
    offline_metrics.knn_radii(real[:3])


def test_distances_in_small_blocks_equal_brute_force(monkeypatch):
  rng = np.random.default_rng(0)
  queries, points = rng.integers(0, 256, (37, 4, 4, 3), np.uint8), rng.integers(0, 256, (23, 4, 4, 3), np.uint8)
  brute = np.sqrt(((queries.reshape(37, 1, -1).astype(float) - points.reshape(1, 23, -1)) ** 2).sum(-1))
  monkeypatch.setattr(offline_metrics, 'CHUNK_ELEMENTS', 50)  # blocks of 2 rows
  np.testing.assert_allclose(offline_metrics.nearest_distances(queries, points), brute.min(axis=1), rtol=1e-12)
  assert (offline_metrics.nearest_distances(points[5:9], points) == 0.0).all()  # copies: exactly 0


def test_memorisation_agreement_confidence_by_hand():
  reference = np.arange(1.0, 102.0)  # median 51, 1st percentile 2
  result = offline_metrics.memorisation(generated_to_train=np.array([0.0, 2.0, 51.0, 102.0]),
                                        reference_to_train=reference)
  assert result == {'memorisation': 26.5 / 51, 'copy_share': 0.5}  # median (2 + 51) / 2; 0 and 2 are ≤ 2
  assert offline_metrics.agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
  assert offline_metrics.confident_share(np.array([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9]])) == 2 / 3
  np.testing.assert_array_equal(offline_metrics.class_histogram(np.array([0, 2, 2]), 4), [1, 0, 2, 0])


def test_frechet_distance_of_features_matches_the_closed_form():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(500, 3)), rng.normal(size=(400, 3)) * 2.0 + 1.0
  want = fid.frechet_distance(mu1=a.mean(0), sigma1=np.cov(a, rowvar=False), mu2=b.mean(0),
                              sigma2=np.cov(b, rowvar=False))
  assert offline_metrics.frechet_distance(a, b) == pytest.approx(want, rel=1e-10)
  assert offline_metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


# -- The benchmark script. ---------------------------------------------------------------------------------------

def test_sample_quality_script_prints_every_metric(data_dir, cache_dir, net, real, tmp_path, capsys):
  samples = str(tmp_path / 'samples.npz')
  image_files.save_npz(samples, {'arr_0': real.probe_images, 'arr_1': real.probe_labels})
  script = runpy.run_path(os.path.join(REPO, 'benchmarks', 'sample_quality.py'))
  script['main'](['--dataset', 'digits', '--data_dir', data_dir, '--cache_dir', cache_dir, samples])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f'feature classifier: accuracy {net.accuracy:.4f} on the 359 \'test\' images')
  assert lines[1].split() == ['source', 'N', *script['COLUMNS']]
  assert lines[2].startswith('real test split (probe half)') and lines[4].startswith(samples)
  assert lines[2].split()[-10:] == lines[4].split()[-10:]  # the same images, the same scores
  histogram = offline_metrics.class_histogram(net.predict(real.probe_images), 10)
  assert lines[3].split() == ['classes'] + [f'{label}:{count}' for label, count in enumerate(histogram)]
