"""`--mode sample`: EMA params of a checkpoint -> samples/ PNG grid + ADM-style npz, for any method."""
import os

import jax

from ddjax import checkpoint, config as config_lib, fid, generate, methods, parallel, train


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
  images, labels = generate.generate_images(
      generate.make_generate_fn(method.sample_fn, mesh), params,
      jax.random.fold_in(jax.random.key(config.seed), step), mesh=mesh, num_samples=config.sample.num_samples,
      batch_size=config.sample.batch_size, num_classes=config.data.num_classes, class_label=config.sample.class_label)
  n, h, w, c = images.shape
  if jax.process_index() != 0:  # every process sampled its share; one writes
    return images, labels
  stem = os.path.join(workdir, 'samples', f'samples_{n}x{h}x{w}x{c}_step{step}')
  fid.save_npz(stem + '.npz', {'arr_0': images, 'arr_1': labels})  # the ADM evaluation suite's format
  generate.save_grid(stem + '.png', images[:min(n, 100)], columns=train.grid_columns(config),
                     scale=train.grid_scale(config))
  print(f'{n} samples ({method.sampler}) from step {step}: {stem}.npz, grid {stem}.png', flush=True)
  return images, labels
