"""`--mode sample`: EMA params of a checkpoint -> samples/ PNG grid + ADM-style npz."""
import os

import jax

from ddjax import checkpoint, config as config_lib, generate, parallel, schedules, train
from ddjax.models import create_model


def load_ema_params(config, model, workdir: str, step: int | None = None):
  """(EMA params, step) of the checkpoint at `step` (newest when None); restored into an abstract template."""
  manager = checkpoint.create_manager(workdir, read_only=True)
  state = checkpoint.restore(manager, train.abstract_train_state(config, model), step)
  return state.ema_params, int(state.step)


def sample_and_save(config, workdir: str):
  config_lib.validate(config)
  model = create_model(config)
  betas = schedules.get_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
  params, step = load_ema_params(config, model, workdir, config.sample.checkpoint_step)
  mesh = parallel.DataParallel.create(config.parallel.mode).mesh
  generate_fn = generate.make_generate_fn(config, model, betas, mesh)
  images, labels = generate.generate_images(
      generate_fn, params, jax.random.fold_in(jax.random.key(config.seed), step), mesh=mesh,
      num_samples=config.sample.num_samples, batch_size=config.sample.batch_size,
      num_classes=config.data.num_classes, class_label=config.sample.class_label)
  n, h, w, c = images.shape
  if jax.process_index() != 0:  # every process sampled its share; one writes
    return images, labels
  stem = os.path.join(workdir, 'samples', f'samples_{n}x{h}x{w}x{c}_step{step}')
  generate.save_npz(stem + '.npz', images, labels)
  generate.save_grid(stem + '.png', images[:min(n, 100)], columns=train.grid_columns(config),
                     scale=train.grid_scale(config))
  print(f'{n} samples from step {step}: {stem}.npz, grid {stem}.png', flush=True)
  return images, labels
