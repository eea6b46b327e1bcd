"""FID and IS against closed forms; the FID Inception's shapes, size and layers; the torch-free reader of both
torch file formats against torch itself; the CLI's one-line failures."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddjax import fid, parallel, torch_pickle
from ddjax.models import inception
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
    fid.save_stats(paths[-1], stats)
  fid.main(['score', *paths])
  a, b = fid.load_stats(paths[0]), fid.load_stats(paths[1])
  want = fid.frechet_distance(mu1=a['mu'], sigma1=a['sigma'], mu2=b['mu'], sigma2=b['sigma'])
  word, value = capsys.readouterr().out.split()
  assert word == 'FID' and len(value.replace('.', '').lstrip('0')) >= 6 and float(value) == pytest.approx(want,
                                                                                                          rel=1e-6)
  fid.main(['score', paths[0], paths[0]])
  assert abs(float(capsys.readouterr().out.split()[1])) < 1e-6


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


def test_conv_bn_mapping_matches_torch():
  """A torch conv (asymmetric kernel and padding) + BatchNorm(eps 0.001) + ReLU and our BasicConv2d with the
  converted state_dict give the same output."""
  torch.manual_seed(0)
  conv, bn = torch.nn.Conv2d(4, 6, (1, 7), padding=(0, 3), bias=False), torch.nn.BatchNorm2d(6, eps=0.001)
  bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
  bn.bias.data.uniform_(-1, 1)
  bn.eval()
  x = torch.randn(2, 4, 9, 9)
  want = torch.relu(bn(conv(x))).detach().numpy().transpose(0, 2, 3, 1)
  variables = {'params': {'conv': {'kernel': conv.weight.detach().numpy().transpose(2, 3, 1, 0)},
                         'bn': {'scale': bn.weight.detach().numpy(), 'bias': bn.bias.detach().numpy()}},
               'batch_stats': {'bn': {'mean': bn.running_mean.numpy(), 'var': bn.running_var.numpy()}}}
  got = inception.BasicConv2d(6, (1, 7), padding=(0, 3)).apply(variables, x.numpy().transpose(0, 2, 3, 1))
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
  features, logits = fid.compute_features(fid.array_batches(images, FEATURE_BATCH), variables, mesh=mesh,
                                          batch_size=FEATURE_BATCH)
  assert features.shape == (11, 2048) and logits.shape == (11, 1008)
  assert np.isfinite(features).all() and (features >= 0).all() and features.std(axis=0).max() > 0
  # Logits are pool3·W (no bias), the Inception Score's convention; padding the last batch changes nothing.
  np.testing.assert_allclose(logits, features @ variables['params']['fc']['kernel'], rtol=1e-4, atol=1e-4)
  again, _ = fid.compute_features(fid.array_batches(images[8:], FEATURE_BATCH), variables, mesh=mesh,
                                  batch_size=FEATURE_BATCH)
  np.testing.assert_allclose(again, features[8:], rtol=1e-5, atol=1e-6)


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
