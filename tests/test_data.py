"""The digits TFDS builder and the input pipeline (ddjax.data)."""
import itertools
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

from configs import digits as digits_config
from ddjax import data
from ddjax.datasets import digits
from tests.tiny import REPO


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  """A data_dir holding the prepared digits dataset, shared by this module's tests."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


def make_config(data_dir, **data_overrides):
  config = digits_config.get_config()
  config.data.data_dir = data_dir
  config.data.batch_size = 64
  config.data.update(data_overrides)
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def sorted_rows(images) -> list:
  """Images (pixels or model-space floats) as the sorted list of their bytes: equal for the same images in any
  order."""
  return sorted(map(bytes, images.reshape(len(images), -1)))


def to_pixels(model_images):
  return np.round((model_images + 1) * 127.5).astype(np.uint8)


def assert_same_batches(batches, expected):
  assert len(batches) == len(expected)
  for batch, want in zip(batches, expected):
    np.testing.assert_array_equal(batch['image'], want['image'])
    np.testing.assert_array_equal(batch['label'], want['label'])


# ---------------------------------------------------------------- the digits builder

def test_digits_builder_matches_sklearn(digits_dir):
  builder = tfds.builder('digits', data_dir=digits_dir)
  assert builder.is_prepared()
  splits = builder.info.splits
  assert (splits['train'].num_examples, splits['test'].num_examples) == (1438, 359)
  assert builder.info.features['image'].shape == (8, 8, 1)

  train = tfds.as_numpy(builder.as_dataset(split='train', batch_size=-1))
  assert train['image'].shape == (1438, 8, 8, 1) and train['image'].dtype == np.uint8
  assert set(train['label'].tolist()) == set(range(10))

  sk = sklearn_datasets.load_digits()
  idx = digits.split_indices()['train']
  want = np.round(sk.images[idx] * 255 / 16).reshape(len(idx), -1)
  assert want.max() == 255  # 16 -> 255
  # TFDS stores examples in its own order: compare (label, pixels) rows as sorted sets.
  rows = lambda labels, pixels: sorted(map(tuple, np.c_[labels, pixels.reshape(len(labels), -1)]))
  assert rows(train['label'], train['image']) == rows(sk.target[idx], want)


def test_digits_split_indices_partition_all_images():
  idx = digits.split_indices()
  assert len(idx['train']) + len(idx['test']) == 1797
  assert not set(idx['train']) & set(idx['test'])


def test_processes_preparing_digits_at_once_all_read_it(tmp_path):
  """The processes of a multi-process run all prepare the digits in the same data_dir at first use: one does, the
  others wait for it (without the lock, TFDS's renames collided and 2 of 3 processes failed)."""
  # Imported first, then released together once all three are ready (a file each), so that they do meet.
  script = '\n'.join([
      'import os, sys, time', 'from ddjax import data', 'data_dir, ready, me = sys.argv[1:]',
      'open(os.path.join(ready, me), "w").close()', 'while len(os.listdir(ready)) < 3: time.sleep(0.001)',
      'print(int(data.prepared_builder("digits", data_dir).as_dataset(split="train").cardinality()))'])
  (tmp_path / 'ready').mkdir()
  processes = [subprocess.Popen([sys.executable, '-c', script, str(tmp_path / 'data'), str(tmp_path / 'ready'),
                                 str(i)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(3)]
  outputs = [process.communicate(timeout=300) for process in processes]
  assert [process.returncode for process in processes] == [0, 0, 0], [err[-2000:] for _, err in outputs]
  assert [out.split()[-1] for out, _ in outputs] == ['1438'] * 3


# ---------------------------------------------------------------- the pipeline on digits

def test_batches_shape_dtype_range(digits_dir):
  batch = next(data.create_dataset(make_config(digits_dir)))
  assert batch['image'].shape == (64, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0
  # Exact scaling: uint8 pixel p maps to p / 127.5 - 1.
  np.testing.assert_allclose((batch['image'] + 1) * 127.5, np.round((batch['image'] + 1) * 127.5),
                             atol=1e-4)


def test_deterministic_under_seed(digits_dir):
  config = make_config(digits_dir)
  first = take(data.create_dataset(config), 3)
  assert_same_batches(take(data.create_dataset(config), 3), first)
  config.seed = 1
  other = take(data.create_dataset(config), 3)
  assert not np.array_equal(other[0]['label'], first[0]['label'])


def test_epochs_are_reshuffled_and_cover_the_split(digits_dir):
  # One host, batch 719 = half the train split: batches 0-1 are epoch 0, batches 2-3 epoch 1.
  batches = take(data.create_dataset(make_config(digits_dir, batch_size=719)), 4)
  epoch0 = np.concatenate([b['image'] for b in batches[:2]])
  epoch1 = np.concatenate([b['image'] for b in batches[2:]])
  assert not np.array_equal(epoch0, epoch1)
  assert sorted_rows(epoch0) == sorted_rows(epoch1)  # each epoch is the whole split once


@pytest.mark.parametrize('start_step', [5, 22, 23, 50])
def test_resume_equals_fresh_iterator(digits_dir, start_step):
  # 1438 examples / 64 per batch: batch 22 straddles the first epoch boundary, 45 the second.
  config = make_config(digits_dir, random_flip=True)
  fresh = take(data.create_dataset(config), start_step + 3)
  assert_same_batches(take(data.create_dataset(config, start_step=start_step), 3),
                      fresh[start_step:])


def test_two_hosts_get_disjoint_halves(digits_dir):
  config = make_config(digits_dir)
  per_host = []
  for index in range(2):
    batches = take(data.create_dataset(config, process_index=index, process_count=2), 11)
    assert batches[0]['image'].shape == (32, 8, 8, 1)
    # 11 batches of 32 = 352 < 719 examples per host: no repeats within a host.
    per_host.append({(bytes(i), int(l)) for b in batches for i, l in zip(b['image'], b['label'])})
  assert len(per_host[0]) == len(per_host[1]) == 352
  assert not per_host[0] & per_host[1]


def test_random_flip_flips_some_images_deterministically(digits_dir):
  plain = take(data.create_dataset(make_config(digits_dir)), 2)
  flipped = take(data.create_dataset(make_config(digits_dir, random_flip=True)), 2)
  assert_same_batches(take(data.create_dataset(make_config(digits_dir, random_flip=True)), 2),
                      flipped)
  images = np.concatenate([b['image'] for b in plain])
  flips = np.concatenate([b['image'] for b in flipped])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in plain]),
                                np.concatenate([b['label'] for b in flipped]))
  is_flipped = np.all(flips == images[:, :, ::-1], axis=(1, 2, 3))
  unchanged = np.all(flips == images, axis=(1, 2, 3))
  assert np.all(is_flipped | unchanged)
  assert 30 < np.sum(is_flipped & ~unchanged) < 98  # of 128 images, about half


# ---------------------------------------------------------------- TFDS datasets, mocked

@pytest.mark.parametrize('dataset, image_size, num_channels', [
    ('mnist', 28, 1),
    ('mnist', 32, 3),  # resize + grayscale -> RGB
    ('cifar10', 32, 3),
    ('cifar10', 16, 1),  # resize + RGB -> grayscale
    ('imagenet_resized/64x64', 64, 3),
    ('oxford_flowers102', 32, 3),  # images of varying size: centre square, then resize
    ('celeb_a', 32, 3),  # 218x178 and no labels
])
def test_mocked_tfds_datasets(tmp_path, dataset, image_size, num_channels):
  config = make_config(str(tmp_path), dataset=dataset, image_size=image_size,
                       num_channels=num_channels, batch_size=8, random_flip=True)
  with tfds.testing.mock_data(num_examples=20):
    batches = take(data.create_dataset(config, start_step=3), 2)
  for batch in batches:
    assert batch['image'].shape == (8, image_size, image_size, num_channels)
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    assert -1.0 <= batch['image'].min() < batch['image'].max() <= 1.0
    if dataset == 'celeb_a':
      np.testing.assert_array_equal(batch['label'], 0)


def test_mocked_images_unchanged_when_sizes_match(tmp_path):
  config = make_config(str(tmp_path), dataset='cifar10', image_size=32, num_channels=3,
                       batch_size=20)
  with tfds.testing.mock_data(num_examples=20):
    raw = np.stack([ex['image'] for ex in tfds.as_numpy(tfds.load('cifar10', split='train'))])
    batch = next(data.create_dataset(config))
  assert sorted_rows(to_pixels(batch['image'])) == sorted_rows(raw)


def test_files_in_the_real_format(tmp_path):
  """ImageNet-64 as `tfds build` leaves it (TFRecord shards of PNG examples and their dataset_info), random
  content (benchmarks/input_pipeline.py writes it): found prepared, and one epoch's batch is its images."""
  from benchmarks import input_pipeline
  config = make_config(str(tmp_path), dataset='imagenet_resized/64x64', image_size=64, num_channels=3,
                       batch_size=32)
  input_pipeline.write_random_dataset(config, str(tmp_path), num_examples=32)
  data.check_prepared(config, 'train')
  raw = np.stack([ex['image'] for ex in tfds.as_numpy(tfds.load('imagenet_resized/64x64', split='train',
                                                                   data_dir=str(tmp_path)))])
  batch = next(data.create_dataset(config))
  assert raw.shape == (32, 64, 64, 3) and sorted_rows(to_pixels(batch['image'])) == sorted_rows(raw)


# ---------------------------------------------------------------- bad input

def test_missing_dataset_says_how_to_prepare(tmp_path):
  config = make_config(str(tmp_path), dataset='mnist')
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.create_dataset(config)
  assert time.monotonic() - start < 5  # no download attempted
  message = str(error.value)
  assert '\n' not in message
  assert f'tfds build mnist --data_dir {tmp_path}' in message
  assert not list(tmp_path.iterdir())  # nothing downloaded or written


def test_check_prepared_by_mode(tmp_path, digits_dir):
  """train and eval need the dataset, sample none; the built-in digits is prepared on first use."""
  config = make_config(str(tmp_path), dataset='mnist')
  data.check_prepared(config, 'sample')
  for mode in ('train', 'eval'):
    with pytest.raises(data.DatasetNotFoundError, match=f'^dataset .mnist. is not prepared in {tmp_path}: '):
      data.check_prepared(config, mode)
  assert not list(tmp_path.iterdir())
  data.check_prepared(make_config(digits_dir), 'eval')


@pytest.mark.parametrize('size, archives', [
    (64, 'Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip'),
    (32, 'Imagenet32_train_npz.zip and Imagenet32_val_npz.zip'),
])
def test_imagenet_resized_says_where_its_archives_go_and_its_label_order(tmp_path, size, archives):
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.check_prepared(make_config(str(tmp_path), dataset=f'imagenet_resized/{size}x{size}'), 'train')
  assert str(error.value) == (
      f"dataset 'imagenet_resized/{size}x{size}' is not prepared in {tmp_path}: prepare it with `tfds build "
      f'imagenet_resized/{size}x{size} --data_dir {tmp_path}` after putting {archives} (image-net.org serves them '
      f'to logged-in ImageNet users) in {tmp_path}/downloads/manual/; note that its labels are those of the '
      'downsampled-ImageNet release, not the standard synset-sorted ImageNet order '
      '(see https://www.tensorflow.org/datasets/catalog/imagenet_resized)')


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="config.data.dataset='no_such_set'"):
    data.create_dataset(make_config(str(tmp_path), dataset='no_such_set'))


def test_batch_not_divisible_by_hosts(digits_dir):
  with pytest.raises(ValueError, match='^data.batch_size=63'):
    data.create_dataset(make_config(digits_dir, batch_size=63), process_index=0, process_count=2)


def test_fixed_shards_give_the_same_global_batches_on_any_process_count(digits_dir):
  config = make_config(digits_dir, num_shards=4)
  one_process = take(data.create_dataset(config, start_step=20), 3)
  per_process = [take(data.create_dataset(config, start_step=20, process_index=p, process_count=2), 3)
                 for p in range(2)]
  for step, whole in enumerate(one_process):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(whole[key], np.concatenate([per_process[0][step][key],
                                                                per_process[1][step][key]]))
  with pytest.raises(ValueError, match='^data.num_shards=3'):
    data.create_dataset(make_config(digits_dir, num_shards=3), process_index=0, process_count=2)
