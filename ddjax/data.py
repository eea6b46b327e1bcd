"""The TFDS input pipeline: infinite, shuffled per-host batches, deterministic and resumable.

A host's batch sequence is a pure function of (config.seed, process_index, process_count): epoch e
of the host's shard is shuffled with a seed derived from (seed, process_index, e), and the flip of
its i-th example uses a stateless key derived from the same key, e and i. Resuming at step s thus
starts directly at epoch s*host_batch // n (n examples per host) and skips only the rest within
it, so resuming costs no more after many epochs than after one.
"""
import fcntl
import os
from collections.abc import Iterator

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data only: keep TensorFlow's C++ banner off the console

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import ddjax.datasets  # noqa: F401  (registers the 'digits' builder with TFDS)
from ddjax.validation import check, fail

tf.config.set_visible_devices([], 'GPU')  # TensorFlow must not take accelerator memory from JAX

# Offline datasets that ddjax prepares itself on first use.
_BUILT_IN = ('digits',)
# What `tfds build` alone does not tell, by builder name.
_PREPARE_NOTES = {
    'imagenet_resized': '; note that its labels are those of the downsampled-ImageNet release, not the standard '
                        'synset-sorted ImageNet order',
}


class DatasetNotFoundError(ValueError):
  """The configured dataset is unknown to TFDS or not prepared in the data_dir."""


def create_dataset(config, *, split='train', start_step=0, process_index=None,
                   process_count=None) -> Iterator[dict]:
  """Yields {'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b]} forever.

  b = config.data.batch_size // process_count (process_* default to jax.process_index/count()).

  The split is cut into `data.num_shards` equal shards (0: one per process). Process p reads only its
  contiguous shards p·k … (p+1)·k − 1 (k = num_shards / process_count), each shuffled and batched on its
  own, and yields their concatenation. The global batch (every process's batch, in process order) is thus
  a function of (seed, num_shards) alone: a fixed num_shards gives the same training on any number of
  hosts that divides it. `start_step=s` yields exactly the batches a fresh iterator yields from its s-th on.
  """
  data = config.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_shards = data.num_shards or process_count
  check(num_shards % process_count == 0, 'data.num_shards', data.num_shards,
        f'0 (one shard per process) or a multiple of the process count {process_count}')
  check(data.batch_size % num_shards == 0, 'data.batch_size', data.batch_size,
        f'a multiple of the number of data shards {num_shards}')
  builder = prepared_builder(data.dataset, data.data_dir)
  per_process = num_shards // process_count
  shards = [_shard_batches(config, builder, split, shard, num_shards, start_step)
            for shard in range(process_index * per_process, (process_index + 1) * per_process)]
  ds = shards[0] if len(shards) == 1 else tf.data.Dataset.zip(tuple(shards)).map(
      lambda *batches: {k: tf.concat([b[k] for b in batches], axis=0) for k in batches[0]})
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _shard_batches(config, builder, split, shard, num_shards, start_step) -> tf.data.Dataset:
  """Shard `shard` of `num_shards` of the split: shuffled per epoch, batched, resumed at `start_step`."""
  data = config.data
  shard_batch = data.batch_size // num_shards
  shard_split = tfds.split_for_jax_process(split, process_index=shard, process_count=num_shards,
                                           drop_remainder=True)
  # Images stay encoded until after the resume skip, so skipping does not pay for decoding.
  examples = read_split(builder, shard_split, decoders={'image': tfds.decode.SkipDecoding()})
  # The dataset's own cardinality, not builder.info: under tfds.testing.mock_data the split sizes
  # are unknown.
  examples_per_shard = int(examples.cardinality())
  check(examples_per_shard >= shard_batch, 'data.batch_size', data.batch_size,
        f'at most {examples_per_shard * num_shards}: each of the {num_shards} data shards has '
        f'{examples_per_shard} examples of {data.dataset!r} {split!r}, fewer than its batch of {shard_batch}')

  key = tf.constant([config.seed, shard], tf.int64)
  epoch_key = lambda epoch_index: tf.random.experimental.stateless_fold_in(key, epoch_index)

  def epoch(epoch_index):
    """The shard in the order of `epoch_index`."""
    shuffle_seed = tf.random.stateless_uniform([], epoch_key(epoch_index), minval=None, maxval=None,
                                               dtype=tf.int64)
    return examples.shuffle(data.shuffle_buffer, seed=shuffle_seed)

  image_feature = builder.info.features['image']
  has_labels = 'label' in builder.info.features  # unlabelled sets (celeb_a, lsun) get class 0

  def preprocess(position, example):
    """The example at `position` in the shard's stream (epoch · examples_per_shard + its index in the epoch),
    decoded, resized and flipped with a key of its own: those of the epoch and the index."""
    image = to_model_space(image_feature.decode_example(example['image']), data.image_size,
                            data.num_channels)
    if data.random_flip:
      flip_key = tf.random.experimental.stateless_fold_in(epoch_key(position // examples_per_shard),
                                                          position % examples_per_shard)
      image = tf.image.stateless_random_flip_left_right(image, flip_key)
    label = tf.cast(example['label'], tf.int32) if has_labels else tf.constant(0, tf.int32)
    return {'image': image, 'label': label}

  # The flip keys are made in the parallel map from each example's position, not by a map of their own in the
  # sequential part (shuffle, skip, enumerate), which capped a shard at 34k examples/s where the sequential part
  # alone runs 150k/s (one core of a 2.6 GHz EPYC): an 8-GPU node training ImageNet-64 in bf16 takes 17-21k/s.
  position = start_step * shard_batch
  return (tf.data.Dataset.range(position // examples_per_shard, np.iinfo(np.int64).max)
          .flat_map(epoch)
          .skip(position % examples_per_shard)
          .enumerate(start=position)
          .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(shard_batch, drop_remainder=True))


def prepared_builder(name, data_dir):
  """The TFDS builder of `name`; ddjax's own datasets are prepared offline on first use."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(f'config.data.dataset={name!r} is not a TFDS dataset '
                               '(see https://www.tensorflow.org/datasets/catalog)') from None
  if builder.name in _BUILT_IN and not builder.is_prepared():
    # Every process of a multi-process run comes here at once with the same data_dir (and so may a run started
    # beside another): unserialised, TFDS's renames of their incomplete copies collide and all but one fail. Under
    # the lock one prepares it; the others then find it prepared and only read it.
    os.makedirs(builder.data_dir_root, exist_ok=True)
    with open(os.path.join(builder.data_dir_root, f'.{builder.name}.prepare.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = tfds.builder(name, data_dir=data_dir)  # prepared by now if another process was first
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def check_prepared(config, mode: str) -> None:
  """Raises DatasetNotFoundError (one line: how to prepare it) unless data.dataset is prepared in data.data_dir
  when `mode` reads it; ddjax.main calls this before any mode builds or writes anything. 'train' reads its
  training split; 'eval' and 'sweep' a split named by eval.reference and the held-out examples of the NLL
  (eval.bpd_examples > 0), so not with a stats file and no NLL; 'sample' reads no data."""
  uses_a_split = config.eval.reference in ('train', 'validation', 'test') or config.eval.bpd_examples > 0
  if mode == 'train' or (mode in ('eval', 'sweep') and uses_a_split):
    builder = prepared_builder(config.data.dataset, config.data.data_dir)
    if not builder.is_prepared():
      raise not_prepared(builder)


def read_split(builder, split, decoders):
  """builder.as_dataset, turning TFDS's "could not find data" into a one-line how-to-prepare error.

  Whether the data is there is decided by as_dataset itself, not by builder.is_prepared(), so that
  tfds.testing.mock_data, which patches as_dataset but writes no files, runs this same code path.
  """
  try:
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  except AssertionError:
    if builder.is_prepared():
      raise
    raise not_prepared(builder) from None


def not_prepared(builder) -> DatasetNotFoundError:
  """The one-line error for a dataset that is not prepared in its data_dir: the `tfds build` command to run."""
  name = builder.info.full_name.rsplit('/', 1)[0]  # with the config, without the version
  root = builder.data_dir_root
  how = f'`tfds build {name} --data_dir {root}`'
  manual = _manual_archives(builder) or (builder.MANUAL_DOWNLOAD_INSTRUCTIONS and 'its manual download')
  if manual:
    how += f' after putting {manual} in {root}/downloads/manual/'
  how += _PREPARE_NOTES.get(builder.name, '')
  return DatasetNotFoundError(f'dataset {name!r} is not prepared in {root}: prepare it with {how} '
                              f'(see https://www.tensorflow.org/datasets/catalog/{builder.name})')


def _manual_archives(builder) -> str | None:
  """The files `tfds build` would download itself but cannot (a login is needed), which TFDS then takes from its
  manual_dir, <data_dir>/downloads/manual/, if they are there."""
  if builder.name != 'imagenet_resized':
    return None
  size = builder.builder_config.size
  train = (f'Imagenet{size}_train_part1_npz.zip, Imagenet{size}_train_part2_npz.zip' if size == 64
           else f'Imagenet{size}_train_npz.zip')
  return f'{train} and Imagenet{size}_val_npz.zip (image-net.org serves them to logged-in ImageNet users)'


def to_model_space(image, image_size, num_channels):
  """uint8 [h, w, c] -> float32 [image_size, image_size, num_channels] in [-1, 1]."""
  image = tf.cast(image, tf.float32)
  height, width = image.shape[:2]
  if height is None or height != width:
    side = tf.minimum(tf.shape(image)[0], tf.shape(image)[1])
    image = tf.image.resize_with_crop_or_pad(image, side, side)  # the centre square
  if image.shape[:2] != (image_size, image_size):
    # Antialiased bilinear: area-like when shrinking, bilinear when enlarging.
    image = tf.image.resize(image, (image_size, image_size), method='bilinear', antialias=True)
  channels = image.shape[-1]
  if channels == 1 and num_channels == 3:
    image = tf.image.grayscale_to_rgb(image)
  elif channels == 3 and num_channels == 1:
    image = tf.image.rgb_to_grayscale(image)
  elif channels != num_channels:
    fail('data.num_channels', num_channels, f'{channels} (the dataset\'s channels), or 1 <-> 3')
  return image / 127.5 - 1.0
