"""Sample quality of ADM-format sample files by the offline metrics of ddjax.evaluation.offline_metrics (no Inception weights).

Run after `python -m ddjax.main --config configs/digits.py --workdir W --mode sample`:
  python benchmarks/sample_quality.py --dataset digits [--cache_dir D] W/samples/samples_*.npz
Prints the feature classifier's held-out accuracy, then a row of every metric of `offline_metrics.score` and the
class histogram of the classifier's labels, first for real held-out images (the probe half of the held-out split:
what real data scores), then for each file (arr_0 uint8 images [N, H, W, C], arr_1 the requested labels if any).
The images are compared at the files' size and channels; the network trains on first use (seconds for digits)
and is cached in --cache_dir.
"""
import argparse
import sys

import numpy as np

from ddjax import image_files
from ddjax.evaluation import fid, offline_metrics

COLUMNS = ('fd', 'fd_floor', 'precision', 'recall', 'memorisation', 'copy_share', 'confident_share',
           'rarest_class_share', 'agreement', 'classifier_accuracy')


def read_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(arr_0 uint8 images, arr_1 labels or None when the file has none)."""
  images = image_files.load_images(path)
  with np.load(path) as saved:
    return images, saved['arr_1'] if 'arr_1' in saved.files else None


def width(column: str) -> int:
  return max(len(column), 9) + 2


def print_row(name: str, images, labels, *, net, real) -> None:
  metrics = offline_metrics.score(images, labels, net=net, real=real)
  values = ''.join(f'{metrics[column]:>{width(column)}.4f}' if column in metrics else f'{"-":>{width(column)}}'
                   for column in COLUMNS)
  histogram = offline_metrics.class_histogram(net.predict(images), net.model.num_classes)
  print(f'{name:<40} {len(images):>6}{values}')
  print(f'{"":<40}   classes ' + ' '.join(f'{label}:{count}' for label, count in enumerate(histogram)))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dataset', default='digits', help='the labelled TFDS dataset the samples imitate')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--cache_dir', default=None, help=f'for the feature network (default {fid.CACHE_DIR})')
  parser.add_argument('samples', nargs='+', help='ADM-format .npz files')
  args = parser.parse_args(argv)
  try:
    files = {path: read_samples(path) for path in args.samples}
    _, size, _, channels = next(iter(files.values()))[0].shape
    net = offline_metrics.load_or_train(args.dataset, data_dir=args.data_dir, image_size=size,
                                        num_channels=channels, cache_dir=args.cache_dir)
    real = offline_metrics.real_reference(args.dataset, data_dir=args.data_dir, image_size=size,
                                          num_channels=channels, net=net)
    provenance = net.provenance
    print(f'feature classifier: accuracy {net.accuracy:.4f} on the {provenance["heldout_count"]} '
          f'{provenance["heldout_split"]!r} images of {args.dataset!r} ({size}x{size}x{channels}, seed '
          f'{provenance["seed"]}; {offline_metrics.cache_path(args.cache_dir, provenance)})')
    print(f'{"source":<40} {"N":>6}' + ''.join(f'{column:>{width(column)}}' for column in COLUMNS))
    print_row(f'real {provenance["heldout_split"]} split (probe half)', real.probe_images, real.probe_labels,
              net=net, real=real)
    for path, (images, labels) in files.items():
      print_row(path, images, labels, net=net, real=real)
  except ValueError as error:  # FileFormatError, a missing or unlabelled dataset, samples of another shape
    print(f'sample_quality: {" ".join(str(error).split())}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
