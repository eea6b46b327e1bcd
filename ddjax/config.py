"""Config validation in one place: every key checked before anything is built or compiled.

Each failure is one `ConfigError` line naming the key, the value and what is allowed; the CLI prints it and
exits with status 2.
"""
import importlib.util
import pathlib

import jax

from ddjax import methods, parallel
from ddjax.models import validate_model
from ddjax.validation import check, check_choice, check_types

# The type of every generic key, checked first so that a wrong type is one line here, not a TypeError in a
# comparison below: {what the message says is allowed: (Python types, keys)}. A method checks its own keys' types
# (methods/<name>.TYPES), the model its own.
_NONE = type(None)
# eval.metrics: FID/IS with the Inception weights, the offline metrics of a feature classifier trained on the
# dataset (ddjax.offline_metrics), both, or 'auto': FID/IS when the weights can be had, else the offline ones.
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
    'None or a string': ((str, _NONE), 'data.data_dir eval.inception_weights eval.cache_dir'),
}


def validate(config, *, device_count: int | None = None):
  """Every key of `config`, for `device_count` devices (default: those this program sees): the generic keys
  here, then the method's (methods.validate) and the model's."""
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


def load_config_module(path):
  """The config file at `path` as a module. Config files are loaded by path (ml_collections config_flags),
  not as a package, so a config built on another loads its sibling this way."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
