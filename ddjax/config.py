"""Config validation in one place: every key checked before anything is built or compiled.

Each failure is one `ConfigError` line naming the key, the value and what is allowed; the CLI prints it and
exits with status 2.
"""
import importlib.util
import pathlib

import jax
import numpy as np

from ddjax import methods, parallel, samplers, schedules
from ddjax.models import validate_model
from ddjax.validation import check, check_choice, check_types, fail

# The type of every generic key, checked first so that a wrong type is one line here, not a TypeError in a
# comparison below: {what the message says is allowed: (Python types, keys)}. A method checks its own keys' types
# (methods/<name>.TYPES), the model its own.
_NONE = type(None)
# eval.metrics: FID/IS with the Inception weights, the offline metrics of a feature classifier trained on the
# dataset (ddjax.evaluation.offline_metrics), both, or 'auto': FID/IS when the weights can be had, else the offline ones.
EVAL_METRICS = ('auto', 'inception', 'offline', 'both')
_TYPES = {
    'an int': ((int,), 'seed data.image_size data.num_channels data.num_classes data.batch_size data.shuffle_buffer '
               'train.num_steps train.grad_accum_steps train.log_every train.checkpoint_every train.sample_every '
               'train.keep_checkpoints sample.class_label sample.num_samples sample.batch_size eval.num_samples '
               'eval.batch_size eval.bpd_examples'),
    'a float': ((int, float), 'model.dropout train.ema_decay'),
    'a string': ((str,), 'method data.dataset model.name parallel.mode parallel.precision eval.reference '
                 'eval.metrics'),
    'True or False': ((bool,), 'data.random_flip model.remat'),
    'None or an int': ((int, _NONE), 'sample.checkpoint_step'),
    'None or a string': ((str, _NONE), 'weights data.data_dir eval.inception_weights eval.cache_dir'),
}


def validate(config, *, device_count: int | None = None, mode: str = 'train'):
  """Every key of `config`, for `device_count` devices (default: those this program sees): the generic keys
  here, then the method's (methods.validate) and the model's; for `mode` 'sweep' also the grid (sweep_grid),
  which no other mode reads, and for 'import' the weights file (ddjax.pretrained)."""
  check_types(config, _TYPES)
  data, train, sample = config.data, config.train, config.sample
  check(bool(data.dataset.strip()), 'data.dataset', data.dataset, "a TFDS dataset name such as 'digits' or 'mnist'")
  check(data.image_size >= 1, 'data.image_size', data.image_size, '>= 1')
  check(data.num_channels in (1, 3), 'data.num_channels', data.num_channels, '1 or 3')
  check(data.num_classes >= 0, 'data.num_classes', data.num_classes, '>= 0 (0 = unconditional)')
  check(data.batch_size >= 1, 'data.batch_size', data.batch_size, '>= 1')
  check(data.shuffle_buffer >= 1, 'data.shuffle_buffer', data.shuffle_buffer, '>= 1 (1 = no shuffling)')

  methods.validate(config, device_count or jax.device_count())
  validate_model(config)
  check(0 <= config.model.dropout < 1, 'model.dropout', config.model.dropout, 'in [0, 1)')

  check(train.num_steps >= 1, 'train.num_steps', train.num_steps, '>= 1')
  check(0 <= train.ema_decay < 1, 'train.ema_decay', train.ema_decay, 'in [0, 1)')
  check(train.keep_checkpoints >= 1, 'train.keep_checkpoints', train.keep_checkpoints, '>= 1')
  for key in ('log_every', 'checkpoint_every', 'sample_every'):
    check(train[key] >= 0, f'train.{key}', train[key], '>= 0 (0 = only at the end)')

  check(-1 <= sample.class_label < max(data.num_classes, 1), 'sample.class_label', sample.class_label,
        f'-1 (random) or 0..{data.num_classes - 1}')
  check(sample.num_samples >= 1, 'sample.num_samples', sample.num_samples, '>= 1')
  check(sample.batch_size >= 1, 'sample.batch_size', sample.batch_size, '>= 1')
  check(sample.checkpoint_step is None or sample.checkpoint_step >= 0, 'sample.checkpoint_step',
        sample.checkpoint_step, 'None (newest) or a saved step')

  check_choice('eval.metrics', config.eval.metrics, EVAL_METRICS)
  check(config.eval.num_samples >= 1, 'eval.num_samples', config.eval.num_samples, '>= 1')
  check(config.eval.batch_size >= 1, 'eval.batch_size', config.eval.batch_size, '>= 1')
  check(config.eval.bpd_examples >= 0, 'eval.bpd_examples', config.eval.bpd_examples, '>= 0 (0 = skip the NLL)')
  check(config.eval.reference in ('train', 'validation', 'test') or config.eval.reference.endswith('.npz'),
        'eval.reference', config.eval.reference, "'train', 'validation', 'test' (a split of data.dataset) or a "
        'stats .npz path')

  parallel.validate(config, device_count)
  if mode == 'sweep':
    sweep_grid(config)
  check(mode != 'import' or config.weights is not None, 'weights', config.weights,
        'the path of a published checkpoint with --mode import (--config.weights=PATH)')


# The sweep's grid axes: comma lists in strings (command-line friendly: --config.sweep.eta=0,0.5,1).
SWEEP_LISTS = 'sweep.sampler sweep.num_steps sweep.spacing sweep.step_size sweep.eta sweep.ddim_scale sweep.guidance'


def sweep_grid(config) -> list[dict]:
  """The cells of `--mode sweep`, each {'sampler', 'num_steps', 'spacing', 'step_size', 'eta', 'ddim_scale',
  'guidance'}: every sampler × step setting × guidance × noise setting. Step settings: each sweep.num_steps N on
  each grid of sweep.spacing, then each sweep.step_size k (the seed's stride, spacing None; its cells' num_steps
  is the number of steps it visits). Noise settings for 'ddim': each sweep.eta η, then each sweep.ddim_scale s
  (the seed's update, eta None); 'ddpm' and 'dpm++2m' have none (eta and ddim_scale None). A bad list is one
  ConfigError line, before anything is built."""
  check(config.method == 'diffusion', 'method', config.method,
        "'diffusion' with --mode sweep (a DDGAN samples with its fixed gan.num_timesteps generator calls and has "
        'no eta or guidance to sweep)')
  check_types(config, {'a comma list in a string': ((str,), SWEEP_LISTS), 'an int': ((int,), 'sweep.num_samples')})
  sweep, T = config.sweep, config.diffusion.num_timesteps
  check(sweep.num_samples >= 1, 'sweep.num_samples', sweep.num_samples, '>= 1')
  sampler_names = _comma_list(config, 'sampler', str, f'a comma list of {", ".join(samplers.SAMPLERS)}')
  for name in sampler_names:
    check_choice('sweep.sampler', name, samplers.SAMPLERS)
  spacing_names = _comma_list(config, 'spacing', str, f'a comma list of {", ".join(schedules.SPACINGS)}')
  for name in spacing_names:
    check_choice('sweep.spacing', name, schedules.SPACINGS)
  num_steps, step_sizes = (_comma_list(config, name, int, f'a comma list of {what} in 1..{T} (diffusion.num_timesteps)',
                                       low=1, high=T) for name, what in (('num_steps', 'step counts'),
                                                                         ('step_size', 'strides')))
  etas, scales, guidances = (_comma_list(config, name, float, 'a comma list of numbers >= 0', low=0)
                             for name in ('eta', 'ddim_scale', 'guidance'))
  check(bool(num_steps or step_sizes), 'sweep.num_steps', sweep.num_steps,
        'a non-empty comma list of step counts (or sweep.step_size strides)')
  check(bool(etas or scales) or 'ddim' not in sampler_names, 'sweep.eta', sweep.eta,
        "a non-empty comma list (or sweep.ddim_scale values) for sweep.sampler 'ddim'")
  check(bool(guidances), 'sweep.guidance', sweep.guidance, 'a non-empty comma list of numbers >= 0')
  check(not any(guidances) or config.data.num_classes > 0, 'sweep.guidance', sweep.guidance,
        '0 for an unconditional model (data.num_classes=0)')
  check(not any(guidances) or config.train.p_uncond > 0, 'sweep.guidance', sweep.guidance,
        '0 unless train.p_uncond > 0 (the null class must be trained for classifier-free guidance)')
  check(bool(spacing_names) or not num_steps, 'sweep.spacing', sweep.spacing,
        'a non-empty comma list of grids for sweep.num_steps')
  grids = [(n, spacing, None) for spacing in spacing_names for n in num_steps] + [
      (len(schedules.spaced_timesteps(T, step_size=k)), None, k) for k in step_sizes]
  cells = []
  for sampler in sampler_names:
    noises = [(eta, None) for eta in etas] + [(None, s) for s in scales] if sampler == 'ddim' else [(None, None)]
    for steps, spacing, step_size in grids:
      for guidance in guidances:
        cells += [{'sampler': sampler, 'num_steps': steps, 'spacing': spacing, 'step_size': step_size, 'eta': eta,
                   'ddim_scale': scale, 'guidance': guidance} for eta, scale in noises]
  return cells


def _comma_list(config, name: str, kind: type, allowed: str, *, low=None, high=None) -> list:
  """sweep.<name> 'a,b,c' -> [kind(a), kind(b), kind(c)] (repeats dropped; '' -> []), each in [low, high]."""
  value = config.sweep[name]
  items = [item.strip() for item in value.split(',')] if value.strip() else []
  try:
    parsed = list(dict.fromkeys(kind(item) for item in items))
  except ValueError:
    fail(f'sweep.{name}', value, allowed)
  in_range = all((low is None or item >= low) and (high is None or item <= high) for item in parsed)
  check(in_range and (kind is not float or bool(np.all(np.isfinite(parsed)))), f'sweep.{name}', value, allowed)
  return parsed


def load_config_module(path):
  """The config file at `path` as a module. Config files are loaded by path (ml_collections config_flags),
  not as a package, so a config built on another loads its sibling this way."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
