"""How many images a second one host's input pipeline (ddjax.data.create_dataset: read, shuffle, decode, flip,
batch) delivers, on a dataset written in TFDS's real format (TFRecord shards of PNG-encoded examples, with its
dataset_info) with random content, so it runs where the real dataset cannot be downloaded:

  python benchmarks/input_pipeline.py --config configs/imagenet64_res_res.py [--batch 1024] [--examples 8192]

Random pixels compress worse than photographs, so their PNGs are larger and slower to decode than the real set's:
the figure is a floor. Prints one JSON line: images/s, the cores the process kept busy, and images/s per busy core
(the pipeline's decode runs on every core; what a node with more cores gets is about that times its cores).
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddjax import config as config_lib, data

SHARDS = 8


def write_random_dataset(config, root: str, num_examples: int) -> None:
  """`num_examples` random images of config.data.dataset's features as its prepared train split under `root`."""
  builder = tfds.builder(config.data.dataset, data_dir=root)
  features = builder.info.features
  rng = np.random.default_rng(0)

  def random_value(feature, index: int):
    if isinstance(feature, tfds.features.Image):
      shape = [config.data.image_size if size is None else size for size in feature.shape]
      return rng.integers(0, 256, shape, np.uint8)
    if isinstance(feature, tfds.features.ClassLabel):
      return int(rng.integers(feature.num_classes))
    if isinstance(feature, tfds.features.Text):
      return f'example_{index}'
    raise NotImplementedError(f'a random value of {feature!r}')

  os.makedirs(builder.data_dir, exist_ok=True)
  for shard in range(SHARDS):
    path = os.path.join(builder.data_dir, f'{builder.name}-train.tfrecord-{shard:05d}-of-{SHARDS:05d}')
    with tf.io.TFRecordWriter(path) as writer:
      for index in range(shard * num_examples // SHARDS, (shard + 1) * num_examples // SHARDS):
        writer.write(features.serialize_example({name: random_value(feature, index)
                                                 for name, feature in features.items()}))
  tfds.folder_dataset.write_metadata(data_dir=builder.data_dir, features=features, split_infos=None,
                                     filename_template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/imagenet64_res_res.py')
  parser.add_argument('--batch', type=int, default=1024, help="one host's batch")
  parser.add_argument('--examples', type=int, default=8192, help='examples written, in 8 shards')
  parser.add_argument('--batches', type=int, default=40, help='batches timed, after 5 untimed')
  args = parser.parse_args()
  config = config_lib.load_config_module(args.config).get_config()
  config.data.batch_size = args.batch
  with tempfile.TemporaryDirectory() as root:
    write_random_dataset(config, root, args.examples)
    config.data.data_dir = root
    batches = data.create_dataset(config, process_index=0, process_count=1)
    for _ in range(5):
      next(batches)
    start, times = time.perf_counter(), os.times()
    for _ in range(args.batches):
      next(batches)
    seconds, end_times = time.perf_counter() - start, os.times()
  busy = (end_times.user + end_times.system - times.user - times.system) / seconds
  images_per_sec = args.batches * args.batch / seconds
  print(json.dumps({'dataset': config.data.dataset, 'image_size': config.data.image_size, 'batch': args.batch,
                    'images_per_sec': round(images_per_sec), 'cores_busy': round(busy, 2),
                    'cores': os.cpu_count(), 'images_per_sec_per_busy_core': round(images_per_sec / busy)}))


if __name__ == '__main__':
  main()
