"""Are generated digits the digits asked for? A classifier trained on the real digits train split labels them.

Run after `python -m ddjax.main --config configs/digits.py --workdir W --mode sample`:
  python benchmarks/digits_accuracy.py W/samples/samples_*.npz
Prints the classifier's accuracy on the real test split (its own quality) and on the samples (arr_0 images,
arr_1 the requested labels), overall and per class.
"""
import sys

import numpy as np
from sklearn import datasets, svm

from ddjax.datasets import digits


def train_classifier():
  """An RBF SVM on the real train split, on 0..255 pixels scaled to [0, 1] (the generated images' scale)."""
  data = datasets.load_digits()
  pixels = digits.pixels_uint8(data.images).reshape(len(data.images), -1) / 255.0
  split = digits.split_indices()
  classifier = svm.SVC(gamma='scale', C=10.0).fit(pixels[split['train']], data.target[split['train']])
  test_accuracy = classifier.score(pixels[split['test']], data.target[split['test']])
  return classifier, test_accuracy


def main(paths):
  classifier, test_accuracy = train_classifier()
  print(f'classifier accuracy on the real test split: {test_accuracy:.4f}')
  for path in paths:
    samples = np.load(path)
    images, labels = samples['arr_0'], samples['arr_1']
    predicted = classifier.predict(images.reshape(len(images), -1) / 255.0)
    per_class = ' '.join(f'{c}:{np.mean(predicted[labels == c] == c):.2f}' for c in np.unique(labels))
    print(f'{path}: {len(images)} samples, accuracy {np.mean(predicted == labels):.4f}  ({per_class})')


if __name__ == '__main__':
  main(sys.argv[1:])
