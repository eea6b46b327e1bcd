"""FID and IS against closed forms; streamed statistics against numpy, in host memory flat in N; the FID
Inception's shapes, size and layers; the torch-free reader of both torch file formats against torch itself; the
CLI's one-line failures."""
import functools
import os
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddjax import image_files, parallel
from ddjax.evaluation import fid, inception, torch_pickle
from tests.tiny import REPO

# torch state_dict leaf of each Flax variable: (collection, Flax name) -> torch name
_TORCH_LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
                 ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


def random_state_dict(seed: int = 0) -> dict:
  """A state_dict with pytorch-fid's keys and shapes (num_batches_tracked included) and random values: He-scaled
  conv weights and near-identity BatchNorms, so the features of random images stay finite and varied."""
  rng = np.random.default_rng(seed)
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(inception.abstract_variables())[0]:
    collection, *names, flax_name = [k.key for k in path]
    name = '.'.join(names + [_TORCH_LEAVES[(collection, flax_name)]])
    shape = leaf.shape
    if flax_name == 'kernel' and len(shape) == 4:  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif flax_name == 'kernel':  # fc [in, out] -> [out, in]
      value = rng.normal(0.0, 0.05, shape[::-1])
    elif flax_name == 'var':
      value = rng.uniform(0.9, 1.1, shape)
      state['.'.join(names + ['num_batches_tracked'])] = np.array(7, np.int64)
    else:
      value = (flax_name == 'scale') + rng.normal(0.0, 0.05, shape)
    state[name] = value.astype(np.float32)
  return state


def save_torch(path, state: dict, *, legacy: bool) -> None:
  """torch.save of `state` as tensors, in the legacy (pre-1.6) or the zip format."""
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path,
             _use_new_zipfile_serialization=not legacy)


def parameter_count_of_fid_inception() -> int:
  """From the layer list of pytorch-fid's FID Inception (torchvision Inception3, 1008 classes, no aux head)."""
  def conv(cin, cout, kh, kw=None):  # conv without bias + BatchNorm scale and bias
    return cin * cout * kh * (kw or kh) + 2 * cout

  def block_a(cin, pool):
    return (conv(cin, 64, 1) + conv(cin, 48, 1) + conv(48, 64, 5) + conv(cin, 64, 1) + conv(64, 96, 3)
            + conv(96, 96, 3) + conv(cin, pool, 1))

  def block_c(c7):
    return (conv(768, 192, 1) + conv(768, c7, 1) + conv(c7, c7, 1, 7) + conv(c7, 192, 7, 1) + conv(768, c7, 1)
            + conv(c7, c7, 7, 1) + conv(c7, c7, 1, 7) + conv(c7, c7, 7, 1) + conv(c7, 192, 1, 7)
            + conv(768, 192, 1))

  def block_e(cin):
    return (conv(cin, 320, 1) + conv(cin, 384, 1) + conv(384, 384, 1, 3) + conv(384, 384, 3, 1)
            + conv(cin, 448, 1) + conv(448, 384, 3) + conv(384, 384, 1, 3) + conv(384, 384, 3, 1)
            + conv(cin, 192, 1))

  stem = conv(3, 32, 3) + conv(32, 32, 3) + conv(32, 64, 3) + conv(64, 80, 1) + conv(80, 192, 3)
  block_b = conv(288, 384, 3) + conv(288, 64, 1) + conv(64, 96, 3) + conv(96, 96, 3)
  block_d = (conv(768, 192, 1) + conv(192, 320, 3) + conv(768, 192, 1) + conv(192, 192, 1, 7)
             + conv(192, 192, 7, 1) + conv(192, 192, 3))
  return (stem + block_a(192, 32) + block_a(256, 64) + block_a(288, 64) + block_b + block_c(128) + block_c(160)
          + block_c(160) + block_c(192) + block_d + block_e(1280) + block_e(2048) + 2048 * 1008 + 1008)


# -- Math. -----------------------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  a, b = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
  # Commuting (diagonal) covariances: d² = ‖μ₁−μ₂‖² + Σ (a + b − 2√(ab)).
  want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  assert fid.frechet_distance(mu1=mu1, sigma1=np.diag(a), mu2=mu2, sigma2=np.diag(b)) == pytest.approx(want,
                                                                                                      abs=1e-6)
  # A full covariance against the identity: d² = ‖μ₁−μ₂‖² + Tr(Σ + I − 2Σ^½), Σ^½ = Q diag(√λ) Qᵀ.
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  sigma = q @ np.diag(a) @ q.T
  want = np.sum((mu1 - mu2) ** 2) + np.trace(sigma) + 6 - 2 * np.sum(np.sqrt(a))
  assert fid.frechet_distance(mu1=mu1, sigma1=sigma, mu2=mu2, sigma2=np.eye(6)) == pytest.approx(want, abs=1e-6)
  # Identical Gaussians, even singular ones (the eps·I retry): 0.
  features = rng.normal(size=(5, 8))  # rank 4 covariance in 8 dimensions
  stats = fid.statistics(features, np.zeros((5, 1008)))
  assert abs(fid.frechet_distance(mu1=stats['mu'], sigma1=stats['sigma'], mu2=stats['mu'],
                                  sigma2=stats['sigma'])) < 1e-6


def test_statistics_follow_pytorch_fid():
  features = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
  stats = fid.statistics(features, np.zeros((50, 1008)), source='x')
  centred = np.float64(features) - np.float64(features).mean(axis=0)
  np.testing.assert_allclose(stats['sigma'], centred.T @ centred / 49, rtol=1e-12)  # N − 1
  assert stats['mu'].dtype == np.float64 and stats['count'] == 50 and stats['source'] == 'x'


@pytest.mark.parametrize('k', [1, 2, 7])
def test_inception_score_extremes(k):
  assert fid.inception_score(np.zeros((40, 1008))) == pytest.approx((1.0, 0.0))  # uniform: IS 1
  labels = np.arange(10 * k) % k  # each of the 10 splits holds every class once
  confident = np.where(np.arange(1008) == labels[:, None], 1e4, 0.0)
  mean, std = fid.inception_score(confident)
  assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_score_cli_prints_fid(tmp_path, capsys):
  rng = np.random.default_rng(2)
  paths = []
  for i in range(2):
    stats = fid.statistics(rng.normal(i, 1.0, size=(30, 5)), np.zeros((30, 1008)))
    paths.append(str(tmp_path / f'{i}.npz'))
    image_files.save_npz(paths[-1], stats)
  fid.main(['score', *paths])
  a, b = fid.load_stats(paths[0]), fid.load_stats(paths[1])
  want = fid.frechet_distance(mu1=a['mu'], sigma1=a['sigma'], mu2=b['mu'], sigma2=b['sigma'])
  word, value = capsys.readouterr().out.split()
  assert word == 'FID' and len(value.replace('.', '').lstrip('0')) >= 6 and float(value) == pytest.approx(want,
                                                                                                          rel=1e-6)
  fid.main(['score', paths[0], paths[0]])
  assert abs(float(capsys.readouterr().out.split()[1])) < 1e-6


def test_running_moments_equal_numpy():
  """Σf and Σfᵀf over uneven float32 batches give np.mean / np.cov of the concatenation (features with a mean far
  from 0, as pool3 features are non-negative, so that the one-pass formula's cancellation would show)."""
  rng = np.random.default_rng(5)
  batches = [rng.normal(3.0, 0.5, size=(n, 2048)).astype(np.float32) for n in (1, 7, 64, 3, 125)]
  moments = fid.RunningMoments()
  for batch in batches:
    moments.add(batch)
  features = np.float64(np.concatenate(batches))
  assert moments.count == 200
  np.testing.assert_allclose(moments.mean(), features.mean(axis=0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(moments.covariance(), np.cov(features, rowvar=False), rtol=0, atol=1e-10)


def fake_inception(num_features: int = inception.NUM_FEATURES, num_logits: int = inception.NUM_LOGITS):
  """A stand-in for fid.make_feature_fn: (features, logits) that are a fixed random projection of each image,
  sharded as the network's, at a tiny fraction of its cost."""
  def make_feature_fn(mesh):
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.AXIS))

    @functools.partial(jax.jit, out_shardings=sharded)
    def features(variables, images):
      del variables
      pixels = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
      projection = jax.random.normal(jax.random.key(0), (pixels.shape[1], num_features + num_logits))
      outputs = pixels @ projection
      return jax.nn.relu(outputs[:, :num_features]), outputs[:, num_features:]

    return features

  return make_feature_fn


def random_batches(num_images: int, batch_size: int = 80):
  """uint8 [batch_size, 8, 8, 1] batches made one at a time: the source itself holds nothing."""
  rng = np.random.default_rng(num_images)
  for _ in range(num_images // batch_size):
    yield rng.integers(0, 256, size=(batch_size, 8, 8, 1), dtype=np.uint8)


def test_streamed_statistics_take_host_memory_flat_in_n(monkeypatch):
  """fid.stats_of of 10× more images peaks at the same host memory: running sums, not features.

  tracemalloc sees numpy's buffers; fetched device arrays are made numpy copies, as a multi-host fetch returns, so
  that holding them would show. 256-d features keep the sums' own O(d²) small next to what N features would take.
  The Inception Score keeps the logits, and the same measurement sees them grow.
  """
  monkeypatch.setattr(fid, 'make_feature_fn', fake_inception(num_features=256, num_logits=64))
  monkeypatch.setattr(parallel, 'fetch', np.array)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), (parallel.AXIS,))

  def peak(num_images, with_inception_score=False):
    tracemalloc.start()
    try:
      stats = fid.stats_of(random_batches(num_images), None, mesh=mesh, batch_size=80,
                           with_inception_score=with_inception_score)
      return tracemalloc.get_traced_memory()[1], stats
    finally:
      tracemalloc.stop()

  peak(80)  # compiled outside the measurement
  (small, _), (large, stats) = peak(160), peak(1600)
  assert stats['count'] == 1600 and stats['sigma'].shape == (256, 256)
  # About 1.7 MB both; holding the 1600 features would add 1600 · 256 · 4 B = 1.6 MB.
  assert large - small < 200_000, (small, large)
  small_is, large_is = peak(160, True)[0], peak(1600, True)[0]
  assert large_is - small_is > 1440 * 64 * 4, (small_is, large_is)  # at least the extra logits


def test_stats_of_is_numpy_of_the_concatenated_features(monkeypatch):
  """fid.stats_of (padded, overlapped batches, running sums) gives np.mean / np.cov of all the features and the
  Inception Score of all the logits; a `count` that is not the number of images streamed is an error."""
  monkeypatch.setattr(fid, 'make_feature_fn', fake_inception())
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  images = np.random.default_rng(6).integers(0, 256, size=(11, 8, 8, 1), dtype=np.uint8)
  outputs = list(fid.feature_batches(fid.array_batches(images, 8), None, mesh=mesh, batch_size=8))
  features, logits = (np.float64(np.concatenate(arrays)) for arrays in zip(*outputs))
  stats = fid.stats_of(fid.array_batches(images, 8), None, mesh=mesh, batch_size=8, with_inception_score=True,
                       source='x', count=11)
  np.testing.assert_allclose(stats['mu'], features.mean(axis=0), rtol=0, atol=1e-10)
  np.testing.assert_allclose(stats['sigma'], np.cov(features, rowvar=False), rtol=0, atol=1e-10)
  assert (stats['is_mean'], stats['is_std']) == fid.inception_score(logits)
  assert (stats['count'], stats['source']) == (11, 'x') and stats['sigma'].max() > 0
  with pytest.raises(ValueError, match='^tfds:x/train gave 11 images, not the 12 expected$'):
    fid.stats_of(fid.array_batches(images, 8), None, mesh=mesh, batch_size=8, with_inception_score=False,
                 source='tfds:x/train', count=12)


# -- The network. ----------------------------------------------------------------------------------------------

def test_network_shapes_and_parameter_count():
  variables = inception.abstract_variables()
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert count == parameter_count_of_fid_inception() == 23_850_960  # torchvision's 27,161,264 − aux + 8 classes
  features, logits = jax.eval_shape(inception.InceptionV3().apply, variables,
                                    jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.uint8))
  assert features.shape == (3, 2048) and logits.shape == (3, 1008) and features.dtype == jnp.float32


def test_pools_and_resize_match_torch():
  x = np.random.default_rng(3).normal(size=(2, 5, 6, 3)).astype(np.float32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))

  def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)

  avg = torch.nn.functional.avg_pool2d(x_torch, 3, stride=1, padding=1, count_include_pad=False)
  np.testing.assert_allclose(inception.avg_pool_3x3(x), nhwc(avg), rtol=1e-6, atol=1e-6)
  peak = torch.nn.functional.max_pool2d(x_torch, 3, stride=1, padding=1)
  np.testing.assert_array_equal(inception.max_pool_3x3(x, stride=1, padding=1), nhwc(peak))
  for size in (299, 4):  # up and down: no antialiasing, as F.interpolate
    resized = torch.nn.functional.interpolate(x_torch, size=(size, size), mode='bilinear', align_corners=False)
    ours = jax.image.resize(x, (2, size, size, 3), 'bilinear', antialias=False)
    np.testing.assert_allclose(ours, nhwc(resized), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel, padding', [((1, 7), (0, 3)), (3, 0)])  # (3, 0): computed padded, then cropped
def test_conv_bn_mapping_matches_torch(kernel, padding):
  """A torch conv (asymmetric kernel and padding, or unpadded 3×3) + BatchNorm(eps 0.001) + ReLU and our
  BasicConv2d with the converted state_dict give the same output."""
  torch.manual_seed(0)
  conv, bn = torch.nn.Conv2d(4, 6, kernel, padding=padding, bias=False), torch.nn.BatchNorm2d(6, eps=0.001)
  bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
  bn.bias.data.uniform_(-1, 1)
  bn.eval()
  x = torch.randn(2, 4, 9, 9)
  want = torch.relu(bn(conv(x))).detach().numpy().transpose(0, 2, 3, 1)
  variables = {'params': {'conv': {'kernel': conv.weight.detach().numpy().transpose(2, 3, 1, 0)},
                         'bn': {'scale': bn.weight.detach().numpy(), 'bias': bn.bias.detach().numpy()}},
               'batch_stats': {'bn': {'mean': bn.running_mean.numpy(), 'var': bn.running_var.numpy()}}}
  got = inception.BasicConv2d(6, kernel, padding=padding).apply(variables, x.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- The weights file. -----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def weights_files(tmp_path_factory):
  """A random state_dict written by torch in both formats: (state, legacy path, zip path)."""
  state = random_state_dict()
  directory = tmp_path_factory.mktemp('weights')
  legacy, zipped = str(directory / 'legacy.pth'), str(directory / 'zip.pth')
  save_torch(legacy, state, legacy=True)
  save_torch(zipped, state, legacy=False)
  return state, legacy, zipped


def test_reader_reads_both_torch_formats(weights_files):
  state, legacy, zipped = weights_files
  with open(legacy, 'rb') as f:
    assert f.read(2) != b'PK'  # not a zip: the legacy sequence of pickles
  for path in (legacy, zipped):
    got = torch_pickle.load_state_dict(path)
    assert list(got) == list(state)
    for name, value in state.items():
      assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  variables = fid.load_variables(legacy)
  np.testing.assert_array_equal(variables['params']['Mixed_7c']['branch3x3_2a']['conv']['kernel'],
                                state['Mixed_7c.branch3x3_2a.conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(variables['batch_stats']['Conv2d_1a_3x3']['bn']['var'],
                                state['Conv2d_1a_3x3.bn.running_var'])


@pytest.mark.parametrize('legacy', [True, False])
def test_reader_handles_views_and_dtypes(tmp_path, legacy):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  tensors = {'view': base[1:, 2:5].t(), 'base': base, 'half': torch.ones(3, dtype=torch.float16) / 3,
             'long': torch.tensor([[1, -2], [3, 4]]), 'scalar': torch.tensor(5), 'empty': torch.zeros(0, 3),
             'bool': torch.tensor([True, False])}
  path = str(tmp_path / 'views.pth')
  torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
  got = torch_pickle.load_state_dict(path)
  for name, tensor in tensors.items():
    np.testing.assert_array_equal(got[name], tensor.numpy(), err_msg=name)
    assert got[name].dtype == tensor.numpy().dtype, name


def test_reader_refuses_other_pickles(tmp_path):
  import pickle
  path = tmp_path / 'evil.pth'
  path.write_bytes(pickle.dumps(os.system, protocol=2))
  with pytest.raises(torch_pickle.TorchFileError):
    torch_pickle.load_state_dict(str(path))
  with pytest.raises(fid.InceptionWeightsError, match='not the FID Inception weights'):
    fid.load_variables(str(path))
  (tmp_path / 'short.pth').write_bytes(b'\x80\x02')
  with pytest.raises(torch_pickle.TorchFileError):
    torch_pickle.load_state_dict(str(tmp_path / 'short.pth'))


def test_other_network_is_refused(tmp_path):
  state = random_state_dict()
  state['fc.weight'] = state['fc.weight'][:1000]
  path = str(tmp_path / 'imagenet1000.pth')
  save_torch(path, state, legacy=False)
  with pytest.raises(fid.InceptionWeightsError, match='fc.kernel has shape'):
    fid.load_variables(path)


# -- Features: one compiled forward pass, shared with test_evaluate through the compilation cache. -------------

FEATURE_BATCH = 8  # test_evaluate uses the same batch of 8×8 grey images, so the same program


def test_features_of_random_weights(weights_files):
  _, legacy, _ = weights_files
  variables = fid.load_variables(legacy)
  images = np.random.default_rng(4).integers(0, 256, size=(11, 8, 8, 1), dtype=np.uint8)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
  outputs = list(fid.feature_batches(fid.array_batches(images, FEATURE_BATCH), variables, mesh=mesh,
                                     batch_size=FEATURE_BATCH))
  assert [(f.shape, l.shape) for f, l in outputs] == [((8, 2048), (8, 1008)), ((3, 2048), (3, 1008))]
  features, logits = (np.concatenate(arrays) for arrays in zip(*outputs))
  assert np.isfinite(features).all() and (features >= 0).all() and features.std(axis=0).max() > 0
  # Logits are pool3·W (no bias), the Inception Score's convention; padding the last batch changes nothing.
  np.testing.assert_allclose(logits, features @ variables['params']['fc']['kernel'], rtol=1e-4, atol=1e-4)
  [(again, _)] = fid.feature_batches(iter([images[8:]]), variables, mesh=mesh, batch_size=FEATURE_BATCH)
  np.testing.assert_allclose(again, features[8:], rtol=1e-5, atol=1e-6)


def test_stats_cli_of_a_dataset_streams_it_with_its_provenance(weights_files, tmp_path, monkeypatch, capsys):
  import tensorflow_datasets as tfds
  _, legacy, _ = weights_files
  monkeypatch.setattr(fid, 'make_feature_fn', fake_inception(num_features=16, num_logits=10))
  out = str(tmp_path / 'ref.npz')
  with tfds.testing.mock_data(num_examples=12):
    fid.main(['stats', '--dataset', 'mnist', '--split', 'test', '--image_size', '8', '--num_channels', '1',
              '--weights', legacy, '--batch_size', '8', '--out', out])
    data_dir = os.fspath(tfds.builder('mnist').data_dir_root)
  assert capsys.readouterr().out == f'12 images; stats in {out}\n'
  stats = fid.load_stats(out)
  assert {k: stats[k] for k in ('source', 'dataset', 'split', 'data_dir', 'image_size', 'num_channels', 'count',
                                'weights_sha256')} == {
      'source': 'tfds:mnist/test', 'dataset': 'mnist', 'split': 'test', 'data_dir': data_dir, 'image_size': 8,
      'num_channels': 1, 'count': 12, 'weights_sha256': fid.sha256_of(legacy)}
  assert stats['mu'].shape == (16,) and 'is_mean' not in stats  # no Inception Score of a split


# -- Failures: one line, exit status 1. ------------------------------------------------------------------------

# An empty cache (HOME) and a proxy that refuses connections: the download fails at once, network or not.
OFFLINE = {'https_proxy': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9'}


def run_fid(*args, home):
  return subprocess.run([sys.executable, '-m', 'ddjax.fid', *args], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, HOME=str(home), **OFFLINE), timeout=120)


def test_missing_weights_is_one_line(tmp_path):
  images = str(tmp_path / 'samples.npz')
  np.savez(images, np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64))
  home = tmp_path / 'home'
  home.mkdir()
  result = run_fid('stats', '--images', images, '--out', str(tmp_path / 'stats.npz'), home=home)
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and fid.WEIGHTS_FILE in lines[0] and fid.WEIGHTS_URL in lines[0], result.stderr
  assert str(home / '.cache' / 'ddjax') in lines[0] and 'Traceback' not in result.stderr
  result = run_fid('stats', '--images', images, '--weights', str(tmp_path / 'nope.pth'), '--out', 'x.npz',
                   home=home)
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [
      f"ddjax.fid: the Inception weights file {tmp_path / 'nope.pth'} does not exist; it should be "
      f'{fid.WEIGHTS_FILE} from {fid.WEIGHTS_URL}']
