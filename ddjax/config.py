"""Config validation in one place: every key checked before anything is built or compiled.

Each failure is one `ConfigError` line naming the key, the value and what is allowed; the CLI prints it and
exits with status 2.
"""
import importlib.util
import pathlib

from ddjax import diffusion, parallel, samplers
from ddjax.models import validate_model
from ddjax.validation import check, check_choice, fail

# The type of every generic key, checked first so that a wrong type is one line here, not a TypeError in a
# comparison below: {what the message says is allowed: (Python types, keys)}. Model-specific keys are checked by
# the model's own validator.
_NONE = type(None)
_TYPES = {
    'an int': ((int,), 'seed data.image_size data.num_channels data.num_classes data.batch_size data.shuffle_buffer '
               'diffusion.num_timesteps model.ch model.t_dim model.c_dim train.num_steps train.warmup_steps '
               'train.grad_accum_steps train.log_every train.checkpoint_every train.sample_every '
               'train.keep_checkpoints sample.class_label sample.num_samples sample.batch_size eval.num_samples '
               'eval.batch_size eval.bpd_examples'),
    'a float': ((int, float), 'diffusion.hybrid_lambda model.dropout train.learning_rate train.weight_decay '
                'train.grad_clip train.ema_decay train.p_uncond sample.eta sample.guidance'),
    'a string': ((str,), 'data.dataset diffusion.schedule diffusion.prediction diffusion.variance diffusion.loss '
                 'model.name sample.sampler parallel.mode parallel.precision eval.reference'),
    'True or False': ((bool,), 'data.random_flip sample.clip_x0 model.remat'),
    'None or an int': ((int, _NONE), 'sample.num_steps sample.step_size sample.checkpoint_step'),
    'None or a float': ((int, float, _NONE), 'sample.ddim_scale'),
    'None or a string': ((str, _NONE), 'data.data_dir eval.inception_weights eval.cache_dir'),
}


def check_types(config):
  for allowed, (types, keys) in _TYPES.items():
    for key in keys.split():
      section, name = key.rpartition('.')[::2]
      holder = config[section] if section else config
      if name not in holder:
        fail(key, None, f'{allowed} (the key is missing from the config)')
      value = holder[name]
      # A bool is an int to Python, never to a config.
      check(isinstance(value, types) and (bool in types or not isinstance(value, bool)), key, value, allowed)


def validate(config, *, device_count: int | None = None):
  """Every key of `config`, for `device_count` devices (default: those this program sees)."""
  check_types(config)
  data, diff, train, sample = config.data, config.diffusion, config.train, config.sample
  check(bool(data.dataset.strip()), 'data.dataset', data.dataset, "a TFDS dataset name such as 'digits' or 'mnist'")
  check(data.image_size >= 1, 'data.image_size', data.image_size, '>= 1')
  check(data.num_channels in (1, 3), 'data.num_channels', data.num_channels, '1 or 3')
  check(data.num_classes >= 0, 'data.num_classes', data.num_classes, '>= 0 (0 = unconditional)')
  check(data.batch_size >= 1, 'data.batch_size', data.batch_size, '>= 1')
  check(data.shuffle_buffer >= 1, 'data.shuffle_buffer', data.shuffle_buffer, '>= 1 (1 = no shuffling)')

  check_choice('diffusion.schedule', diff.schedule, ('linear', 'cosine'))  # vp/geometric are DDGAN's
  check_choice('diffusion.prediction', diff.prediction, diffusion.PREDICTIONS)
  check_choice('diffusion.variance', diff.variance, diffusion.VARIANCES)
  check_choice('diffusion.loss', diff.loss, diffusion.LOSSES)
  check(not (diff.loss == 'simple' and diff.variance == 'learned_range'), 'diffusion.loss', diff.loss,
        "'hybrid' or 'vlb' with diffusion.variance='learned_range' (the simple loss cannot train the variance)")
  check(not (diff.loss == 'hybrid' and diff.variance != 'learned_range'), 'diffusion.loss', diff.loss,
        f"'simple' or 'vlb' with diffusion.variance={diff.variance!r} (the hybrid's vb term stops the mean's "
        'gradient, so with a fixed variance it trains nothing)')
  check(diff.num_timesteps >= (21 if diff.schedule == 'linear' else 1), 'diffusion.num_timesteps',
        diff.num_timesteps, ">= 21 for 'linear', >= 1 for 'cosine'")
  check(diff.hybrid_lambda >= 0, 'diffusion.hybrid_lambda', diff.hybrid_lambda, '>= 0')

  validate_model(config)
  check(0 <= config.model.dropout < 1, 'model.dropout', config.model.dropout, 'in [0, 1)')
  for key in ('t_dim', 'c_dim'):
    check(config.model[key] >= 1, f'model.{key}', config.model[key], '>= 1')

  check(train.num_steps >= 1, 'train.num_steps', train.num_steps, '>= 1')
  check(train.learning_rate > 0, 'train.learning_rate', train.learning_rate, '> 0')
  check(train.warmup_steps >= 0, 'train.warmup_steps', train.warmup_steps, '>= 0')
  check(train.weight_decay >= 0, 'train.weight_decay', train.weight_decay, '>= 0')
  check(train.grad_clip >= 0, 'train.grad_clip', train.grad_clip, '>= 0 (0 = off)')
  check(0 <= train.ema_decay < 1, 'train.ema_decay', train.ema_decay, 'in [0, 1)')
  check(0 <= train.p_uncond < 1, 'train.p_uncond', train.p_uncond, 'in [0, 1)')
  check(train.keep_checkpoints >= 1, 'train.keep_checkpoints', train.keep_checkpoints, '>= 1')
  for key in ('log_every', 'checkpoint_every', 'sample_every'):
    check(train[key] >= 0, f'train.{key}', train[key], '>= 0 (0 = only at the end)')

  check_choice('sample.sampler', sample.sampler, samplers.SAMPLERS)
  T = diff.num_timesteps
  check(sample.num_steps is None or 1 <= sample.num_steps <= T, 'sample.num_steps', sample.num_steps,
        f'None or 1..{T} (diffusion.num_timesteps)')
  check(sample.step_size is None or 1 <= sample.step_size <= T, 'sample.step_size', sample.step_size,
        f'None or 1..{T} (diffusion.num_timesteps)')
  check(sample.eta >= 0, 'sample.eta', sample.eta, '>= 0')
  check(sample.ddim_scale is None or sample.ddim_scale >= 0, 'sample.ddim_scale', sample.ddim_scale,
        'None or >= 0')
  check(sample.ddim_scale is None or sample.sampler == 'ddim', 'sample.ddim_scale', sample.ddim_scale,
        "None unless sample.sampler='ddim'")
  check(sample.guidance >= 0, 'sample.guidance', sample.guidance, '>= 0')
  check(sample.guidance == 0 or data.num_classes > 0, 'sample.guidance', sample.guidance,
        '0 for an unconditional model (data.num_classes=0)')
  check(sample.guidance == 0 or train.p_uncond > 0, 'sample.guidance', sample.guidance,
        '0 unless train.p_uncond > 0 (the null class must be trained for classifier-free guidance)')
  check(-1 <= sample.class_label < max(data.num_classes, 1), 'sample.class_label', sample.class_label,
        f'-1 (random) or 0..{data.num_classes - 1}')
  check(sample.num_samples >= 1, 'sample.num_samples', sample.num_samples, '>= 1')
  check(sample.batch_size >= 1, 'sample.batch_size', sample.batch_size, '>= 1')
  check(sample.checkpoint_step is None or sample.checkpoint_step >= 0, 'sample.checkpoint_step',
        sample.checkpoint_step, 'None (newest) or a saved step')

  check(config.eval.num_samples >= 1, 'eval.num_samples', config.eval.num_samples, '>= 1')
  check(config.eval.batch_size >= 1, 'eval.batch_size', config.eval.batch_size, '>= 1')
  check(config.eval.bpd_examples >= 0, 'eval.bpd_examples', config.eval.bpd_examples, '>= 0 (0 = skip the NLL)')
  check(config.eval.reference in ('train', 'validation', 'test') or config.eval.reference.endswith('.npz'),
        'eval.reference', config.eval.reference, "'train', 'validation', 'test' (a split of data.dataset) or a "
        'stats .npz path')

  parallel.validate(config, device_count)


def load_config_module(path):
  """The config file at `path` as a module. Config files are loaded by path (ml_collections config_flags),
  not as a package, so a config built on another loads its sibling this way."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
