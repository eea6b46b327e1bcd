"""FID and Inception Score with the FID Inception network, as pytorch-fid / TF-FID compute them.

  python -m ddjax.fid stats --images samples.npz --weights pt_inception.pth --out stats.npz
  python -m ddjax.fid stats --dataset cifar10 --split train [--data_dir D] --weights ... --out ref.npz
  python -m ddjax.fid score a.npz b.npz          # prints: FID <value>

A stats file holds `mu` [2048], `sigma` [2048, 2048] (float64) and its provenance (`count`, `weights_sha256`,
`source`; for a dataset also `dataset`, `version`, `split`, `data_dir`, `image_size`, `num_channels`), and for
images also `is_mean`, `is_std`. A dataset's statistics come from running sums over its batches, so host memory
does not grow with its size; they carry no Inception Score (that would hold every logit). A stats file of the
ADM evaluation suite (`mu`, `sigma`) works as a reference too.

JAX, Flax, TensorFlow and the weights reader are imported only by the functions that run the network, read the
weights or read a dataset, so `score` and the numpy statistics answer without their start-up (seconds).
"""
import argparse
import functools
import hashlib
import os
import shutil
import sys
import urllib.request
from typing import TYPE_CHECKING

import numpy as np
import scipy.special

from ddjax import image_files, xla_flags

if TYPE_CHECKING:
  from jax.sharding import Mesh

WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}'
# torch.hub's convention: the hex after the last '-' of the file name is a prefix of the file's sha256; torch.hub
# checks only that prefix when pytorch-fid loads the file, and so do we. (The full digest is reported elsewhere
# as 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2; unverified here, so not enforced.)
WEIGHTS_SHA256_PREFIX = '6726825d'
CACHE_DIR = os.path.join('~', '.cache', 'ddjax')
DOWNLOAD_TIMEOUT_S = 10  # per socket operation: a machine without network fails within seconds
IS_SPLITS = 10


class InceptionWeightsError(Exception):
  """The FID Inception weights are missing, unreadable or not those weights; `str()` is one line."""


# -- Math. -----------------------------------------------------------------------------------------------------

def frechet_distance(*, mu1, sigma1, mu2, sigma2) -> float:
  """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½), in float64 (pytorch-fid's calculate_frechet_distance).

  Tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ, λ the eigenvalues of Sᵀ·Σ₂·S for any S·Sᵀ = Σ₁ (similar to Σ₁Σ₂, and symmetric PSD):
  one symmetric eigenvalue problem instead of pytorch-fid's scipy.linalg.sqrtm (far cheaper at d = 2048, the same
  value to ~1e-12); a singular product needs neither its eps·I retry nor its complex root (rounding's λ < 0 count
  as 0).
  """
  mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
  sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise image_files.FileFormatError(f'the two stats differ in shape: mu {mu1.shape} vs {mu2.shape}, '
                          f'sigma {sigma1.shape} vs {sigma2.shape}')
  factor = covariance_factor(sigma1)
  eigenvalues = np.linalg.eigvalsh(factor.T @ sigma2 @ factor)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def covariance_factor(sigma: np.ndarray) -> np.ndarray:
  """S with S·Sᵀ = Σ: the Cholesky factor when Σ is positive definite (a reference set of 50k), else (fewer
  samples than dimensions) the PSD square root U·diag(√max(λ, 0))·Uᵀ, which takes an eigendecomposition."""
  try:
    return np.linalg.cholesky(sigma)
  except np.linalg.LinAlgError:
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def inception_score(logits: np.ndarray, *, splits: int = IS_SPLITS) -> tuple[float, float]:
  """IS = exp(E_x KL(p(y|x) ‖ p(y))) on each of `splits` consecutive parts (p(y) = the part's mean p(y|x),
  p(y|x) = softmax over the 1008 logits); returns (mean, std) over the parts, as Salimans et al.'s code."""
  probs = scipy.special.softmax(np.float64(logits), axis=-1)
  n = len(probs)
  splits = min(splits, n)
  scores = []
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    kl = scipy.special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def statistics(features: np.ndarray, logits: np.ndarray, **provenance) -> dict:
  """{'mu', 'sigma' (covariance with N − 1, as np.cov), 'is_mean', 'is_std', 'count', **provenance} of arrays
  held in memory; `stats_of` streams instead."""
  features = np.float64(features)
  is_mean, is_std = inception_score(logits)
  return {'mu': features.mean(axis=0), 'sigma': np.cov(features, rowvar=False), 'is_mean': is_mean,
          'is_std': is_std, 'count': len(features), **provenance}


class RunningMoments:
  """The mean and covariance of feature batches from float64 running sums, in O(d²) memory whatever their number:

  μ = Σf / n,  Σ = (Σ fᵀf − n·μμᵀ) / (n − 1)  (N − 1 as np.cov and pytorch-fid; d from the first batch).
  """

  def __init__(self):
    self.count, self.sum, self.outer = 0, None, None

  def add(self, features: np.ndarray) -> None:
    features = np.float64(features)
    if self.sum is None:
      self.sum, self.outer = np.zeros(features.shape[1]), np.zeros((features.shape[1],) * 2)
    self.count += len(features)
    self.sum += features.sum(axis=0)
    self.outer += features.T @ features

  def mean(self) -> np.ndarray:
    return self.sum / self.count

  def covariance(self) -> np.ndarray:
    mean = self.mean()
    return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)


# -- Stats files. ----------------------------------------------------------------------------------------------

def load_stats(path: str) -> dict:
  return image_files.load_npz(path, ('mu', 'sigma'))


# -- Weights. --------------------------------------------------------------------------------------------------

def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def weights_path(path: str | None) -> str:
  """`path` when given (used as given); else the cached file, downloaded on first use."""
  if path:
    if not os.path.isfile(path):
      raise InceptionWeightsError(f'the Inception weights file {path} does not exist; it should be {WEIGHTS_FILE} '
                                  f'from {WEIGHTS_URL}')
    return path
  cached = os.path.join(os.path.expanduser(CACHE_DIR), WEIGHTS_FILE)
  if not os.path.isfile(cached):
    download(cached)
  return cached


def download(destination: str) -> None:
  """WEIGHTS_URL -> `destination`, kept only when its sha256 starts with WEIGHTS_SHA256_PREFIX."""
  partial = destination + '.part'
  try:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with urllib.request.urlopen(WEIGHTS_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, 'wb') as f:
      shutil.copyfileobj(response, f)
  except OSError as error:  # URLError, HTTPError, timeouts, a full disk
    if os.path.exists(partial):
      os.remove(partial)
    reason = ' '.join(str(getattr(error, 'reason', None) or error).split())
    raise InceptionWeightsError(
        f'the FID Inception weights {WEIGHTS_FILE} are needed and could not be downloaded ({reason}): download '
        f'{WEIGHTS_URL} to {destination}, or pass its path (--config.eval.inception_weights, or --weights to '
        f'python -m ddjax.fid)') from None
  digest = sha256_of(partial)
  if not digest.startswith(WEIGHTS_SHA256_PREFIX):
    os.remove(partial)
    raise InceptionWeightsError(f'the download of {WEIGHTS_URL} has sha256 {digest}, not {WEIGHTS_SHA256_PREFIX}…; '
                                f'put the right file at {destination}')
  os.replace(partial, destination)


def load_variables(path: str) -> dict:
  """InceptionV3 variables from a pytorch-fid state_dict file (zip or legacy torch format)."""
  from ddjax.evaluation import torch_pickle
  from ddjax.evaluation import inception
  try:
    return inception.variables_from_state_dict(torch_pickle.load_state_dict(path))
  except OSError as error:
    raise InceptionWeightsError(f'cannot read the Inception weights {path}: {error.strerror or error}') from None
  except ValueError as error:  # TorchFileError, or a key or shape of another network
    raise InceptionWeightsError(f'{path} is not the FID Inception weights ({WEIGHTS_FILE}): {error}') from None


# -- Features. -------------------------------------------------------------------------------------------------

@functools.cache  # one compiled function per mesh
def make_feature_fn(mesh: 'Mesh'):
  """jit(variables, uint8 images [B, H, W, C]) -> (pool3 [B, 2048], logits [B, 1008]), B split over `mesh`.

  Float32 matmuls and convolutions at full precision, so accelerators give the same features as a CPU.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from ddjax import parallel
  from ddjax.evaluation import inception
  model = inception.InceptionV3()
  sharded = NamedSharding(mesh, PartitionSpec(parallel.AXIS))

  @functools.partial(jax.jit, out_shardings=sharded)
  def features(variables, images):
    with jax.default_matmul_precision('highest'):
      return model.apply(variables, images)

  return features


def feature_batches(batches, variables, *, mesh: 'Mesh', batch_size: int):
  """Yields (features [b, 2048], logits [b, 1008]) of each uint8 batch of `batches` (at most batch_size images,
  the same on every process; the outputs are the same on every process too), in order.

  Batch k + 1 is dispatched before batch k's outputs are fetched (JAX dispatch is asynchronous), so the devices
  compute while the host reads the next batch and consumes this one. Each batch is padded to batch_size rounded
  up to the device count (one compilation) and trimmed.
  """
  from ddjax import parallel
  batch_size = -(-batch_size // mesh.size) * mesh.size
  feature_fn = make_feature_fn(mesh)
  variables = parallel.global_replicated(mesh, variables)
  pending = None
  for batch in batches:
    padded = np.zeros((batch_size,) + batch.shape[1:], np.uint8)
    padded[:len(batch)] = batch
    dispatched = feature_fn(variables, parallel.global_sharded(mesh, padded)), len(batch)
    if pending is not None:
      yield fetch_outputs(*pending)
    pending = dispatched
  if pending is not None:
    yield fetch_outputs(*pending)


def fetch_outputs(outputs, count: int) -> tuple[np.ndarray, np.ndarray]:
  from ddjax import parallel
  features, logits = outputs
  return parallel.fetch(features)[:count], parallel.fetch(logits)[:count]


def stats_of(batches, variables, *, mesh: 'Mesh', batch_size: int, with_inception_score: bool, **provenance) -> dict:
  """{'mu', 'sigma', 'count', **provenance} of the uint8 image batches `batches`, from running sums
  (RunningMoments: host memory flat in their number); `with_inception_score` adds 'is_mean' and 'is_std', which
  keep every logit (N × 1008), so only for a bounded number of samples. A `count` in `provenance` must be the
  number of images streamed."""
  moments, logits = RunningMoments(), []
  for batch_features, batch_logits in feature_batches(batches, variables, mesh=mesh, batch_size=batch_size):
    moments.add(batch_features)
    if with_inception_score:
      logits.append(batch_logits)
  if provenance.setdefault('count', moments.count) != moments.count:
    raise ValueError(f'{provenance.get("source")} gave {moments.count} images, not the {provenance["count"]} '
                     'expected')
  result = {'mu': moments.mean(), 'sigma': moments.covariance(), **provenance}
  if with_inception_score:
    result['is_mean'], result['is_std'] = inception_score(np.concatenate(logits))
  return result


def array_batches(images: np.ndarray, batch_size: int):
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


def dataset_batches(dataset: str, split: str, *, data_dir: str | None, batch_size: int,
                    image_size: int | None = None, num_channels: int | None = None):
  """(uint8 images [b, H, W, C], int32 labels [b]) batches of a TFDS split in its stored order, resized as
  training data (ddjax.data) when image_size is given; label 0 for a dataset without labels."""
  from ddjax import data  # TensorFlow only when a dataset is read
  import tensorflow as tf
  builder = data.prepared_builder(dataset, data_dir)
  has_labels = 'label' in builder.info.features

  def convert(example):
    image = example['image']
    if image_size is not None:
      channels = num_channels or builder.info.features['image'].shape[-1]
      model_space = data.to_model_space(image, image_size, channels)
      image = tf.cast(tf.clip_by_value(tf.round((model_space + 1.0) * 127.5), 0, 255), tf.uint8)
    label = tf.cast(example['label'], tf.int32) if has_labels else tf.constant(0, tf.int32)
    return image, label

  examples = data.read_split(builder, split, decoders=None).map(convert, num_parallel_calls=tf.data.AUTOTUNE)
  yield from examples.batch(batch_size).prefetch(2).as_numpy_iterator()


def dataset_provenance(dataset: str, split: str, *, data_dir: str | None, image_size: int | None,
                       num_channels: int | None, weights_sha256: str) -> dict:
  """Everything a split's statistics depend on, as stored in (and checked against) its stats file: dataset,
  TFDS version, split, resolved data_dir, image size and channels (0: as stored), example count, weights."""
  from ddjax import data  # TensorFlow only when a dataset is read
  import tensorflow_datasets as tfds
  builder = data.prepared_builder(dataset, data_dir)
  examples = data.read_split(builder, split, decoders={'image': tfds.decode.SkipDecoding()})
  return {'source': f'tfds:{dataset}/{split}', 'dataset': dataset, 'version': str(builder.version),
          'split': split, 'data_dir': os.path.abspath(os.fspath(builder.data_dir_root)),
          'image_size': image_size or 0, 'num_channels': num_channels or 0, 'count': int(examples.cardinality()),
          'weights_sha256': weights_sha256}


# -- Command line. ---------------------------------------------------------------------------------------------

def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m ddjax.fid', description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  stats = commands.add_parser('stats', help='Inception statistics of an image .npz or a TFDS split')
  source = stats.add_mutually_exclusive_group(required=True)
  source.add_argument('--images', help='.npz whose arr_0 is uint8 images [N, H, W, C] (ADM format)')
  source.add_argument('--dataset', help='TFDS dataset name')
  stats.add_argument('--split', default='train')
  stats.add_argument('--data_dir', default=None)
  stats.add_argument('--image_size', type=int, default=None, help='resize the dataset as training does')
  stats.add_argument('--num_channels', type=int, default=None)
  stats.add_argument('--weights', default=None, help=f'{WEIGHTS_FILE} (default: downloaded to {CACHE_DIR})')
  stats.add_argument('--batch_size', type=int, default=200)
  stats.add_argument('--out', required=True)
  score = commands.add_parser('score', help='print the FID between two stats files')
  score.add_argument('stats', nargs=2)
  args = parser.parse_args(argv)
  try:
    if args.command == 'score':
      a, b = (load_stats(path) for path in args.stats)
      value = frechet_distance(mu1=a['mu'], sigma1=a['sigma'], mu2=b['mu'], sigma2=b['sigma'])
      print(f'FID {value:#.7g}')
      return
    xla_flags.apply()  # before JAX starts its backend
    import jax
    from jax.sharding import Mesh

    from ddjax import parallel
    weights = weights_path(args.weights)
    variables, weights_sha256 = load_variables(weights), sha256_of(weights)
    mesh = Mesh(np.asarray(jax.devices()), (parallel.AXIS,))
    if args.images:
      batches = array_batches(image_files.load_images(args.images), args.batch_size)
      provenance = {'source': args.images, 'weights_sha256': weights_sha256}
    else:
      provenance = dataset_provenance(args.dataset, args.split, data_dir=args.data_dir, image_size=args.image_size,
                                      num_channels=args.num_channels, weights_sha256=weights_sha256)
      batches = (images for images, _ in dataset_batches(
          args.dataset, args.split, data_dir=args.data_dir, batch_size=args.batch_size,
          image_size=args.image_size, num_channels=args.num_channels))
    result = stats_of(batches, variables, mesh=mesh, batch_size=args.batch_size,
                      with_inception_score=bool(args.images), **provenance)
    if jax.process_index() == 0:
      image_files.save_npz(args.out, result)
    score = f': IS {result["is_mean"]:.4f} ± {result["is_std"]:.4f}' if args.images else ''
    print(f'{result["count"]} images{score}; stats in {args.out}')
  except (InceptionWeightsError, OSError, ValueError) as error:
    # ValueError: image_files.FileFormatError, and a dataset that is missing or unprepared (ddjax.data)
    print(f'ddjax.fid: {" ".join(str(error).split())}', file=sys.stderr)
    sys.exit(1)


