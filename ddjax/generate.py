"""Images from a trained network: the compiled sampling function over all devices, pixel conversion, PNG grids."""
import functools
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ddjax import parallel, samplers


def make_generate_fn(sample_fn, mesh):
  """jit(params, rng, indices [B], labels [B], values=None) -> float32 samples [B, H, W, C] in model space,
  compiled once per batch size; `sample_fn(params, keys [B], labels [B], **values)` is the method's sampler
  (methods.base.Method), `values` sampler settings passed as arguments (traced: any value, the same program).

  Sample j is drawn from the key fold_in(rng, indices[j]) (its global index), so it does not depend on the
  batch size, the padding or the device count. The batch is split over every device of `mesh` (params
  replicated and passed to the sampler as an argument).
  """
  @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec(parallel.AXIS)))
  def generate(params, rng, indices, labels, values=None):
    return sample_fn(params, jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices), labels, **(values or {}))

  return generate


def padded_batch_size(batch_size: int, num_devices: int) -> int:
  """The smallest multiple of num_devices >= batch_size: any batch size runs on any device count."""
  return -(-batch_size // num_devices) * num_devices


def generate_images(generate, params, rng, *, mesh, num_samples: int, batch_size: int, num_classes: int,
                    class_label: int = -1, cycle_classes: bool = False, values: dict | None = None):
  """(uint8 images [N, H, W, C], int labels [N]) drawn in batches of `batch_size` (at most N), each padded to
  a multiple of the device count; the padding is dropped.

  Every process calls this with the same arguments (the batches span all hosts' devices); each gets all images.
  Sample i depends only on (rng, i, its label): not on batch_size or the device count.

  Labels: `class_label` for all, random real classes for −1, or 0, 1, …, num_classes−1 repeating when
  `cycle_classes` (grids with the classes in order). `values`: sampler settings for `generate` (scalars).
  """
  label_rng, sample_rng = jax.random.split(rng)
  if not num_classes:
    labels = np.zeros((num_samples,), np.int32)
  elif cycle_classes:
    labels = np.arange(num_samples, dtype=np.int32) % num_classes
  else:
    labels = np.asarray(samplers.draw_labels(label_rng, num_samples, num_classes=num_classes,
                                             class_label=class_label))
  batch_size = min(batch_size, num_samples)
  padded = padded_batch_size(batch_size, mesh.size)
  params = parallel.global_replicated(mesh, params)
  values = parallel.global_replicated(mesh, values) if values else None
  images = []
  for start in range(0, num_samples, batch_size):
    count = min(batch_size, num_samples - start)
    indices = np.arange(start, start + padded, dtype=np.int32)  # indices past the batch are padding
    batch_labels = labels[np.minimum(indices, start + count - 1)]
    x = generate(params, sample_rng, parallel.global_sharded(mesh, indices),
                 parallel.global_sharded(mesh, batch_labels), values)
    images.append(to_uint8(parallel.fetch(x))[:count])
  return np.concatenate(images), labels


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Model space [−1, 1] -> uint8 pixels (the only place samples are clipped)."""
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(path: str, images: np.ndarray, *, columns: int, scale: int = 1, pad: int = 1) -> None:
  """uint8 NHWC images -> one PNG grid, row-major, `columns` wide, each image upscaled `scale`× (nearest)."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if scale > 1:
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  picture.save(path)
