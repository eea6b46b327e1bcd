"""The `digits` TFDS dataset: scikit-learn's bundled 8x8 handwritten digits (no download).

1,797 grayscale 8x8 images of the digits 0-9 (the UCI optical-recognition test set, as bundled with
scikit-learn). Pixel intensities 0..16 are scaled to 0..255 with rounding. Splits are a fixed seeded
permutation: 'train' 1,438 images, 'test' 359 images.
"""
import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

NUM_TEST = 359  # 1797 // 5: an 80/20 split
_SPLIT_SEED = 0


def split_indices():
  """Indices into `sklearn.datasets.load_digits()` for each split (fixed, deterministic)."""
  permutation = np.random.default_rng(_SPLIT_SEED).permutation(1797)
  return {'train': np.sort(permutation[NUM_TEST:]), 'test': np.sort(permutation[:NUM_TEST])}


def pixels_uint8(images):
  """Scales sklearn's 0..16 intensities to 0..255 uint8 with a trailing channel axis."""
  return np.round(np.asarray(images) * (255 / 16)).astype(np.uint8)[..., None]


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits as a TFDS dataset."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # Nothing is downloaded. Saying so also skips TFDS's checksum-file lookup, which imports
  # `importlib_resources`: tfds 4.9.10 does not require it and etils 1.15 no longer pulls it in.
  url_infos = None

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    digits = sklearn_datasets.load_digits()
    images, labels = pixels_uint8(digits.images), digits.target
    return {name: self._generate_examples(images[idx], labels[idx], idx)
            for name, idx in split_indices().items()}

  def _generate_examples(self, images, labels, indices):
    for image, label, index in zip(images, labels, indices):
      yield int(index), {'image': image, 'label': int(label)}
