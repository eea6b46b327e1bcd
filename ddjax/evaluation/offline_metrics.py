"""Offline sample-quality metrics for small labelled datasets (digits, MNIST, …): no Inception weights needed.

A small CNN classifier trained by ddjax on the real train split of the dataset (`load_or_train`: deterministic
given its seed, cached with its provenance) supplies features (its penultimate activations) and labels. From them,
for uint8 samples [N, H, W, C] (`score`):

  fd, fd_floor         Fréchet distance of the samples' features to the held-out reference; the floor is what N
                       real images score (train images, so independent of the reference), i.e. a perfect generator
  precision, recall    improved precision / recall (Kynkäänniemi et al. 2019), k = 3 nearest-neighbour balls
  memorisation,        nearest-training-image distances in pixel space against those of held-out images:
  copy_share           ≈ 1 and ≈ 0.01 for a generator that does not copy, → 0 and → 1 for copies
  confident_share      share of samples the classifier labels with probability ≥ 0.9
  agreement,           (with the requested labels) share labelled as the class asked for, next to the
  classifier_accuracy  classifier's own held-out accuracy, its ceiling

The held-out split (test, else validation) is cut by a seeded permutation into two halves: the `reference` the
samples are compared with, and the `probe`, real held-out images that `score` can rate like samples (the real-data
row: fd ≈ fd_floor, memorisation ≈ 1, agreement ≈ classifier_accuracy). Scoring the reference itself would give
the degenerate fd 0, precision and recall 1.

Everything but the network is numpy; pairwise distances go in row blocks, so memory stays flat in N.
"""
import dataclasses
import functools
import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ddjax import image_files
from ddjax.evaluation import fid

RECIPE_VERSION = 1  # bump whenever the network or its training changes: cached networks are then retrained
FEATURE_DIM = 128
WIDTHS = (32, 64)
EPOCHS = 30
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
EVAL_BATCH = 256  # images per forward pass, the last batch padded: one compilation per image shape
K_NEAREST = 3  # Kynkäänniemi et al.'s k
CONFIDENT = 0.9
COPY_QUANTILE = 0.01
CHUNK_ELEMENTS = 1 << 22  # entries of one block of pairwise distances (32 MiB of float64)
HELDOUT_SPLITS = ('test', 'validation')


# -- The feature network. ----------------------------------------------------------------------------------------

class FeatureCNN(nn.Module):
  """uint8 images [B, H, W, C] (8×8 … 32×32) -> (features [B, feature_dim], logits [B, num_classes]):

  x/127.5 − 1 → conv3×3(w₁) → conv3×3(w₁) → avg-pool 2 → conv3×3(w₂) → avg-pool 2 → dense(feature_dim) → dense(K),
  ReLU after every layer but the last; the features are the penultimate (post-ReLU) activations.
  """
  num_classes: int
  widths: tuple[int, int] = WIDTHS
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0  # model space [-1, 1], as the diffusion trainer sees the data
    x = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
    x = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(self.widths[1], (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.num_classes)(features)


def train_step(params, opt_state, images, labels, *, model, optimizer):
  """One Adam step on the mean softmax cross-entropy of a batch."""
  def loss_fn(params):
    logits = model.apply({'params': params}, images)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  with jax.default_matmul_precision('highest'):  # accelerators train as a CPU does
    grads = jax.grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_params(images: np.ndarray, labels: np.ndarray, *, model: FeatureCNN, seed: int, epochs: int) -> dict:
  """The params of `model` after `epochs` epochs of Adam (BATCH_SIZE, LEARNING_RATE) on uint8 `images`.

  Bitwise reproducible on one machine: the init key is key(seed) and each epoch's order a permutation from
  numpy's Generator(seed), taken on arrays in memory (no tf.data shuffle); an epoch drops its last partial batch,
  so every step has one shape and compiles once.
  """
  if len(images) < BATCH_SIZE:
    raise ValueError(f'the feature network needs at least {BATCH_SIZE} training images, not {len(images)}')
  optimizer = optax.adam(LEARNING_RATE)
  params = model.init(jax.random.key(seed), images[:1])['params']
  opt_state = optimizer.init(params)
  step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer))
  order = np.random.default_rng(seed)
  steps = len(images) // BATCH_SIZE
  for _ in range(epochs):
    for batch in order.permutation(len(images))[:steps * BATCH_SIZE].reshape(steps, BATCH_SIZE):
      params, opt_state = step(params, opt_state, images[batch], labels[batch])
  return jax.device_get(params)


@functools.cache  # one compiled function per network shape
def forward_fn(model: FeatureCNN):
  """jit(params, uint8 images [B, H, W, C]) -> (features [B, D], softmax probabilities [B, K]), full precision."""
  @jax.jit
  def forward(params, images):
    with jax.default_matmul_precision('highest'):
      features, logits = model.apply({'params': params}, images)
    return features, jax.nn.softmax(logits)

  return forward


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A trained FeatureCNN, its held-out accuracy and the provenance it was trained (and cached) under."""
  model: FeatureCNN
  params: dict
  accuracy: float
  provenance: dict

  def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, D], class probabilities float64 [N, K]) of uint8 images [N, H, W, C], in batches of
    EVAL_BATCH (the last one padded, so one compilation per image shape)."""
    forward = forward_fn(self.model)
    features, probabilities = [], []
    for start in range(0, len(images), EVAL_BATCH):
      batch = images[start:start + EVAL_BATCH]
      padded = np.zeros((EVAL_BATCH,) + images.shape[1:], np.uint8)
      padded[:len(batch)] = batch
      batch_features, batch_probabilities = jax.device_get(forward(self.params, padded))
      features.append(batch_features[:len(batch)])
      probabilities.append(batch_probabilities[:len(batch)])
    return np.float64(np.concatenate(features)), np.float64(np.concatenate(probabilities))

  def features(self, images: np.ndarray) -> np.ndarray:
    return self.outputs(images)[0]

  def predict(self, images: np.ndarray) -> np.ndarray:
    return self.outputs(images)[1].argmax(axis=1)


# -- Real data. --------------------------------------------------------------------------------------------------

def load_splits(dataset: str, *, data_dir: str | None, image_size: int, num_channels: int) -> dict:
  """{'train': (images, labels), 'heldout': (images, labels)}: uint8 images [N, image_size, image_size,
  num_channels] and int32 labels [N] of the train and held-out splits (dataset_facts) in their stored order,
  resized as the trainer resizes (data.to_model_space) and quantised as samples are."""
  splits = {'train': 'train', 'heldout': dataset_facts(dataset, data_dir)['heldout_split']}
  loaded = {}
  for name, split in splits.items():
    batches = list(fid.dataset_batches(dataset, split, data_dir=data_dir, batch_size=1024, image_size=image_size,
                                       num_channels=num_channels))
    loaded[name] = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
  return loaded


def dataset_facts(dataset: str, data_dir: str | None) -> dict:
  """{'version', 'num_classes', 'heldout_split', 'train_count', 'heldout_count'} of a labelled TFDS dataset (held
  out: its test split, else its validation split), from its metadata alone."""
  from ddjax import data  # TensorFlow only when a dataset is read
  builder = data.prepared_builder(dataset, data_dir)
  splits = builder.info.splits
  if 'label' not in builder.info.features:
    raise ValueError(f'{dataset!r} has no labels: the offline metrics train a classifier on them')
  heldout = [split for split in HELDOUT_SPLITS if split in splits]
  if 'train' not in splits or not heldout:
    raise ValueError(f'{dataset!r} needs a train split and a test or validation split (it has '
                     f'{", ".join(splits) or "none"})')
  return {'version': str(builder.version), 'num_classes': builder.info.features['label'].num_classes,
          'heldout_split': heldout[0], 'train_count': splits['train'].num_examples,
          'heldout_count': splits[heldout[0]].num_examples}


# -- Cache. ------------------------------------------------------------------------------------------------------

def load_or_train(dataset: str, *, data_dir: str | None, image_size: int, num_channels: int,
                  cache_dir: str | None, seed: int = 0, epochs: int = EPOCHS) -> FeatureNet:
  """The feature network of `dataset` at image_size² × num_channels, from `cache_dir` (None: ~/.cache/ddjax) when
  a file there was trained under the same provenance, else trained on the train split and cached (atomically).

  The provenance — the recipe (RECIPE_VERSION, architecture, epochs, batch, learning rate), seed, dataset, TFDS
  version, split sizes, image size and channels — names the file (a hash) and is stored in it, next to the
  held-out accuracy, and compared on reading: a file whose provenance differs is retrained, never reused. The
  data_dir is not part of it: the same dataset version is the same data wherever it is prepared.
  """
  facts = dataset_facts(dataset, data_dir)
  model = FeatureCNN(num_classes=facts['num_classes'])
  provenance = {'recipe_version': RECIPE_VERSION, 'dataset': dataset, 'version': facts['version'],
                'train_count': facts['train_count'], 'heldout_split': facts['heldout_split'],
                'heldout_count': facts['heldout_count'], 'image_size': image_size, 'num_channels': num_channels,
                'num_classes': model.num_classes, 'widths': list(model.widths), 'feature_dim': model.feature_dim,
                'seed': seed, 'epochs': epochs, 'batch_size': BATCH_SIZE, 'learning_rate': LEARNING_RATE}
  path = cache_path(cache_dir, provenance)
  cached = read_cached(path, model, provenance)
  if cached is not None:
    return cached
  splits = load_splits(dataset, data_dir=data_dir, image_size=image_size, num_channels=num_channels)
  (train_images, train_labels), (heldout_images, heldout_labels) = splits['train'], splits['heldout']
  params = train_params(train_images, train_labels, model=model, seed=seed, epochs=epochs)
  trained = FeatureNet(model, params, accuracy=float('nan'), provenance=provenance)  # its accuracy is next
  accuracy = float(np.mean(trained.predict(heldout_images) == heldout_labels))
  if jax.process_index() == 0:  # every process trains the same network; one writes it
    arrays = {f'params/{name}': value for name, value in traverse_util.flatten_dict(params, sep='/').items()}
    image_files.save_npz(path, {**arrays, 'provenance': json.dumps({**provenance, 'heldout_accuracy': accuracy})})
  return dataclasses.replace(trained, accuracy=accuracy)


def cache_path(cache_dir: str | None, provenance: dict) -> str:
  """<cache_dir>/featurenet_<dataset>_<H>x<W>x<C>_seed<seed>_<hash of the provenance>.npz."""
  key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
  size, channels = provenance['image_size'], provenance['num_channels']
  name = (f'featurenet_{provenance["dataset"].replace("/", "_")}_{size}x{size}x{channels}_seed{provenance["seed"]}_'
          f'{key}.npz')
  return os.path.join(os.path.expanduser(cache_dir or fid.CACHE_DIR), name)


def read_cached(path: str, model: FeatureCNN, provenance: dict) -> FeatureNet | None:
  """The network cached at `path` when it was trained under `provenance`; None when the file is missing,
  unreadable or of another provenance."""
  try:
    with np.load(path) as saved:
      stored = json.loads(str(saved['provenance']))
      params = {name[len('params/'):]: saved[name] for name in saved.files if name.startswith('params/')}
  except (OSError, ValueError, KeyError):
    return None
  accuracy = stored.pop('heldout_accuracy', None)
  if stored != provenance or accuracy is None:
    return None
  return FeatureNet(model, traverse_util.unflatten_dict(params, sep='/'), accuracy=accuracy, provenance=provenance)


# -- Metrics. ----------------------------------------------------------------------------------------------------

def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FD = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_aΣ_b)^½) of two feature sets [N, D], covariances with N − 1
  (fid.RunningMoments, fid.frechet_distance: pytorch-fid's conventions)."""
  (mu1, sigma1), (mu2, sigma2) = moments(features_a), moments(features_b)
  return fid.frechet_distance(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2)


def moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  running = fid.RunningMoments()
  running.add(features)
  return running.mean(), running.covariance()


def squared_distance_blocks(queries: np.ndarray, points: np.ndarray):
  """Yields (rows, ‖q − p‖² [len(rows), len(points)]) for the queries q in row blocks of at most CHUNK_ELEMENTS
  entries, as ‖q‖² + ‖p‖² − 2q·p in float64 (exact for integer pixels: every sum stays below 2⁵³)."""
  queries, points = np.float64(queries.reshape(len(queries), -1)), np.float64(points.reshape(len(points), -1))
  point_norms = np.einsum('ij,ij->i', points, points)
  rows = max(1, CHUNK_ELEMENTS // len(points))
  for start in range(0, len(queries), rows):
    block = queries[start:start + rows]
    squared = np.einsum('ij,ij->i', block, block)[:, None] + point_norms - 2.0 * block @ points.T
    yield slice(start, start + len(block)), np.maximum(squared, 0.0)  # rounding can dip below 0 for floats


def nearest_distances(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
  """d_i = min_j ‖q_i − p_j‖₂ (L2 over every pixel/feature), [len(queries)]."""
  nearest = np.empty(len(queries))
  for rows, squared in squared_distance_blocks(queries, points):
    nearest[rows] = squared.min(axis=1)
  return np.sqrt(nearest)


def knn_radii(points: np.ndarray, *, k: int = K_NEAREST) -> np.ndarray:
  """r_i = ‖p_i − NN_k(p_i)‖₂, the distance to the k-th nearest *other* point (index k of the sorted distances,
  index 0 being p_i itself), [N]."""
  if len(points) <= k:
    raise ValueError(f'k-nearest-neighbour balls with k={k} need more than {k} points, not {len(points)}')
  radii = np.empty(len(points))
  for rows, squared in squared_distance_blocks(points, points):
    radii[rows] = np.partition(squared, k, axis=1)[:, k]
  return np.sqrt(radii)


def covered_share(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
  """(1/N) Σ_i 1[∃j: ‖q_i − c_j‖₂ ≤ r_j]: the share of queries inside the union of the balls B(c_j, r_j)."""
  inside = np.empty(len(queries), bool)
  for rows, squared in squared_distance_blocks(queries, centres):
    inside[rows] = (squared <= radii ** 2).any(axis=1)
  return float(inside.mean())


def precision_recall(real: np.ndarray, generated: np.ndarray, *, k: int = K_NEAREST) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets [N, D]: with B_k(S) the union of
  the balls around each point of S of radius its distance to its k-th nearest other point of S,

  precision = share of generated inside B_k(real),  recall = share of real inside B_k(generated).
  """
  return (covered_share(generated, real, knn_radii(real, k=k)),
          covered_share(real, generated, knn_radii(generated, k=k)))


def memorisation(*, generated_to_train: np.ndarray, reference_to_train: np.ndarray) -> dict:
  """From each image's pixel-space distance to its nearest training image, d = min_t ‖x − t‖₂:

  memorisation = median(d_generated) / median(d_reference)      ≈ 1 without copying, 0 for copies
  copy_share   = share of d_generated ≤ q₀.₀₁(d_reference)        ≈ 0.01 without copying, 1 for copies

  Pixel space, not feature space: a copy is a pixel-for-pixel replica, while the classifier's features are
  trained to bring every good image of a class together, so near-in-features would flag good novel samples too.
  Held-out images are the reference: they show how near an image of the data distribution that was not trained
  on lies to the training set.
  """
  threshold = np.quantile(reference_to_train, COPY_QUANTILE)
  return {'memorisation': float(np.median(generated_to_train) / np.median(reference_to_train)),
          'copy_share': float(np.mean(generated_to_train <= threshold))}


def agreement(predicted: np.ndarray, labels: np.ndarray) -> float:
  """(1/N) Σ 1[predicted_i = labels_i]: the share of samples the classifier labels as the class asked for."""
  return float(np.mean(np.asarray(predicted) == np.asarray(labels)))


def confident_share(probabilities: np.ndarray, *, threshold: float = CONFIDENT) -> float:
  """(1/N) Σ 1[max_y p(y|x_i) ≥ threshold]: the share of samples the classifier is sure of."""
  return float(np.mean(probabilities.max(axis=1) >= threshold))


def class_histogram(predicted: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts of each predicted class [num_classes]: the modes a generator covers."""
  return np.bincount(predicted, minlength=num_classes)


# -- Scoring. ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RealReference:
  """The real images and features the samples are scored against (`real_reference`)."""
  train_images: np.ndarray  # uint8 [N_train, H, W, C]: the memorisation figure's training set
  train_features: np.ndarray  # float64 [N_train, D]: the floor's perfect samples
  reference_features: np.ndarray  # float64 [N_ref, D]: half of the held-out split, what samples are compared with
  reference_to_train: np.ndarray  # [N_ref]: each reference image's pixel distance to its nearest training image
  probe_images: np.ndarray  # uint8: the other half of the held-out split, real images to score as samples
  probe_labels: np.ndarray
  seed: int


def real_reference(dataset: str, *, data_dir: str | None, image_size: int, num_channels: int, net: FeatureNet,
                   seed: int = 0) -> RealReference:
  """The train split and the held-out split cut by numpy's Generator(seed).permutation into the reference (the
  first ⌈N/2⌉) and the probe (the rest), with their features under `net`."""
  splits = load_splits(dataset, data_dir=data_dir, image_size=image_size, num_channels=num_channels)
  (train_images, _), (heldout_images, heldout_labels) = splits['train'], splits['heldout']
  permutation = np.random.default_rng(seed).permutation(len(heldout_images))
  reference, probe = np.split(permutation, [-(-len(permutation) // 2)])
  return RealReference(
      train_images=train_images, train_features=net.features(train_images),
      reference_features=net.features(heldout_images[reference]),
      reference_to_train=nearest_distances(heldout_images[reference], train_images),
      probe_images=heldout_images[probe], probe_labels=heldout_labels[probe], seed=seed)


def fd_floor(real: RealReference, count: int) -> float:
  """FD(min(count, N_train) train images drawn by Generator(real.seed), reference): what a perfect generator with
  `count` samples scores — real images, independent of the reference, as many as the samples (FD is biased upward
  at small N, so only a floor of the same N is comparable). Above N_train, the floor is that of N_train samples,
  a little higher than a perfect generator's."""
  rows = np.random.default_rng(real.seed).choice(len(real.train_features), min(count, len(real.train_features)),
                                                 replace=False)
  return frechet_distance(real.train_features[rows], real.reference_features)


def score(images: np.ndarray, labels: np.ndarray | None, *, net: FeatureNet, real: RealReference) -> dict:
  """{'fd', 'fd_floor', 'precision', 'recall', 'memorisation', 'copy_share', 'confident_share',
  'rarest_class_share'} of uint8 samples [N, H, W, C] against `real`, and 'agreement', 'classifier_accuracy' when
  the requested labels [N] are given."""
  if images.dtype != np.uint8 or images.shape[1:] != real.train_images.shape[1:]:
    raise ValueError(f'the samples are {images.dtype} {images.shape[1:]}; the reference is uint8 '
                     f'{real.train_images.shape[1:]}')
  features, probabilities = net.outputs(images)
  precision, recall = precision_recall(real.reference_features, features)
  metrics = {'fd': frechet_distance(features, real.reference_features), 'fd_floor': fd_floor(real, len(images)),
             'precision': precision, 'recall': recall,
             **memorisation(generated_to_train=nearest_distances(images, real.train_images),
                            reference_to_train=real.reference_to_train),
             'confident_share': confident_share(probabilities),
             'rarest_class_share': float(class_histogram(probabilities.argmax(axis=1), probabilities.shape[1]).min()
                                         / len(images))}
  if labels is not None:
    metrics['agreement'] = agreement(probabilities.argmax(axis=1), labels)
    metrics['classifier_accuracy'] = net.accuracy
  return metrics
