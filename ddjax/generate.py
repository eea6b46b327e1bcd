"""Images from a trained network: the compiled sampling function over all devices, and `--mode sample` (the EMA
params of a checkpoint -> a PNG grid and an ADM-format .npz in samples/, for any method)."""
import functools
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ddjax import checkpoint, config as config_lib, image_files, methods, parallel, samplers


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
    images.append(image_files.to_uint8(parallel.fetch(x))[:count])
  return np.concatenate(images), labels


MAX_GRID_COLUMNS = 16


def grid_columns(config) -> int:
  """One class per column when class-conditional (classes cycling when there are more than 16), else a
  square-ish grid; never more than 16 columns, so a 1000-class grid is not one row 65,000 px wide."""
  wanted = config.data.num_classes or int(np.ceil(np.sqrt(config.sample.num_samples)))
  return min(wanted, MAX_GRID_COLUMNS)


def grid_scale(config) -> int:
  """Upscale small images so a grid is legible (8×8 digits -> 32×32 per cell)."""
  return max(1, 32 // config.data.image_size)


def load_ema_params(config, workdir: str, step: int | None = None):
  """(EMA params, step) of the checkpoint at `step` (newest when None); restored into an abstract template."""
  with checkpoint.opened(workdir, read_only=True) as manager:
    state = checkpoint.restore(manager, methods.abstract_state(config), step)
  return state.ema_params, int(state.step)


def sample_and_save(config, workdir: str):
  config_lib.validate(config)
  method = methods.build(config)
  params, step = load_ema_params(config, workdir, config.sample.checkpoint_step)
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  images, labels = generate_images(
      make_generate_fn(method.sample_fn, mesh), params,
      jax.random.fold_in(jax.random.key(config.seed), step), mesh=mesh, num_samples=config.sample.num_samples,
      batch_size=config.sample.batch_size, num_classes=config.data.num_classes, class_label=config.sample.class_label)
  n, h, w, c = images.shape
  if jax.process_index() != 0:  # every process sampled its share; one writes
    return images, labels
  stem = os.path.join(workdir, 'samples', f'samples_{n}x{h}x{w}x{c}_step{step}')
  image_files.save_npz(stem + '.npz', {'arr_0': images, 'arr_1': labels})  # the ADM evaluation suite's format
  image_files.save_grid(stem + '.png', images[:min(n, 100)], columns=grid_columns(config),
                     scale=grid_scale(config))
  print(f'{n} samples ({method.sampler}) from step {step}: {stem}.npz, grid {stem}.png', flush=True)
  return images, labels
