"""Config validation: every invalid setting stops in `config.validate`, before anything is built, with one line
naming the key, the value and what is allowed; through the CLI that line is all of stderr, with exit status 2."""
import json
import os
import subprocess
import sys

import pytest

from ddjax import config as config_lib
from ddjax.validation import ConfigError
from tests.tiny import REPO, tiny_config, xla_flags

class _Missing:
  """A key deleted from the config. Its repr is fixed: test ids must be the same in every pytest-xdist worker."""

  def __repr__(self):
    return 'MISSING'


MISSING = _Missing()

# (settings, the key the message must name). Types, ranges, unknown names, incompatible combinations.
INVALID = [
    # types (as a config file could write them; command-line values are typed by ml_collections)
    ({'train.num_steps': 'abc'}, 'train.num_steps'),
    ({'train.learning_rate': '1e-3'}, 'train.learning_rate'),
    ({'data.batch_size': 16.0}, 'data.batch_size'),
    ({'data.num_classes': True}, 'data.num_classes'),
    ({'data.random_flip': 1}, 'data.random_flip'),
    ({'sample.num_steps': 5.5}, 'sample.num_steps'),
    ({'train.keep_checkpoints': MISSING}, 'train.keep_checkpoints'),
    # ranges
    ({'data.dataset': ' '}, 'data.dataset'),
    ({'data.image_size': 0}, 'data.image_size'),
    ({'data.num_channels': 2}, 'data.num_channels'),
    ({'data.num_classes': -1}, 'data.num_classes'),
    ({'data.batch_size': 0}, 'data.batch_size'),
    ({'data.shuffle_buffer': 0}, 'data.shuffle_buffer'),
    ({'diffusion.hybrid_lambda': -1.0}, 'diffusion.hybrid_lambda'),
    ({'model.ch': 0}, 'model.ch'),
    ({'model.dropout': 1.0}, 'model.dropout'),
    ({'model.t_dim': 0}, 'model.t_dim'),
    ({'model.c_dim': 0}, 'model.c_dim'),
    ({'train.num_steps': 0}, 'train.num_steps'),
    ({'train.learning_rate': 0.0}, 'train.learning_rate'),
    ({'train.warmup_steps': -1}, 'train.warmup_steps'),
    ({'train.weight_decay': -0.1}, 'train.weight_decay'),
    ({'train.grad_clip': -1.0}, 'train.grad_clip'),
    ({'train.ema_decay': 1.0}, 'train.ema_decay'),
    ({'train.p_uncond': 1.0}, 'train.p_uncond'),
    ({'train.keep_checkpoints': 0}, 'train.keep_checkpoints'),
    ({'train.log_every': -1}, 'train.log_every'),
    ({'sample.eta': -0.5}, 'sample.eta'),
    ({'sample.num_samples': 0}, 'sample.num_samples'),
    ({'sample.class_label': 10}, 'sample.class_label'),
    ({'eval.num_samples': 0}, 'eval.num_samples'),
    # unknown names
    ({'diffusion.schedule': 'sigmoid'}, 'diffusion.schedule'),
    ({'diffusion.prediction': 'score'}, 'diffusion.prediction'),
    ({'diffusion.variance': 'learned'}, 'diffusion.variance'),
    ({'diffusion.loss': 'l1'}, 'diffusion.loss'),
    ({'model.name': 'dit'}, 'model.name'),
    ({'model.blocks': 'res,bogus'}, 'model.blocks'),
    ({'sample.sampler': 'euler'}, 'sample.sampler'),
    ({'parallel.mode': 'pjit'}, 'parallel.mode'),
    ({'parallel.precision': 'float16'}, 'parallel.precision'),
    # incompatible combinations
    ({'diffusion.variance': 'learned_range', 'diffusion.loss': 'simple'}, 'diffusion.loss'),
    ({'diffusion.variance': 'fixed_small', 'diffusion.loss': 'hybrid'}, 'diffusion.loss'),  # vb trains nothing
    ({'diffusion.schedule': 'linear', 'diffusion.num_timesteps': 10}, 'diffusion.num_timesteps'),
    ({'data.num_classes': 0, 'sample.guidance': 1.0}, 'sample.guidance'),
    ({'train.p_uncond': 0.0, 'sample.guidance': 1.0}, 'sample.guidance'),
    ({'sample.step_size': 51}, 'sample.step_size'),  # T is 50
    ({'sample.num_steps': 51}, 'sample.num_steps'),
    ({'sample.sampler': 'ddpm', 'sample.ddim_scale': 0.5}, 'sample.ddim_scale'),
    ({'data.image_size': 6, 'model.num_levels': 3}, 'data.image_size'),  # 6 is not a multiple of 2**2
    ({'model.num_heads': 3}, 'model.num_heads'),  # not a divisor of model.ch=16
    ({'train.grad_accum_steps': 3}, 'train.grad_accum_steps'),  # the batch of 16 does not split in 3
]


def with_settings(settings):
  """The tiny config with `settings`; each replaces its field, so a wrong type gets in as from a config file."""
  config = tiny_config()
  for key, value in settings.items():
    section, name = key.split('.')
    del config[section][name]
    if value is not MISSING:
      config[section][name] = value
  return config


def test_at_least_30_distinct_invalid_settings():
  assert len({tuple(settings.items()) for settings, _ in INVALID}) == len(INVALID) >= 30


@pytest.mark.parametrize('settings, key', INVALID, ids=[', '.join(map(str, s.items())) for s, _ in INVALID])
def test_invalid_setting_is_one_line_naming_key_value_and_allowed(settings, key):
  config = with_settings(settings)
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config)
  section, name = key.split('.')
  value = config[section].get(name)
  message = str(error.value)
  assert message.startswith(f'{key}={value!r} is invalid; allowed: ') and '\n' not in message, message
  assert len(message) > len(f'{key}={value!r} is invalid; allowed: ')


SHIPPED = sorted(os.path.join('configs', name) for name in os.listdir(os.path.join(REPO, 'configs'))
                 if name.endswith('.py') and not name.startswith('_'))


@pytest.mark.parametrize('devices', [1, 2, 4, 8, 16])
def test_shipped_configs_are_valid_on_any_device_count(devices):
  for path in SHIPPED:
    config_lib.validate(config_lib.load_config_module(os.path.join(REPO, path)).get_config(), device_count=devices)


def test_shipped_configs_lower_a_train_step_on_8_devices_at_their_real_shapes():
  """Unmodified, on 8 fake devices: validated, and one train step traced and lowered (not compiled, not run)
  with the real global batch split over the devices, in the formulation a GPU runs (the CPU kernels' branch is
  tests/test_formulations.py's; tracing only one branch halves this test's time)."""
  result = subprocess.run([sys.executable, '-m', 'tests.lower_configs', *SHIPPED], cwd=REPO, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, XLA_FLAGS=xla_flags(8), DDJAX_FORMULATION='plain'))
  assert result.returncode == 0, result.stderr[-3000:]
  lowered = [json.loads(line) for line in result.stdout.splitlines()]
  assert [record['config'] for record in lowered] == SHIPPED
  for record in lowered:
    print(record)
    assert record['devices'] == 8 and record['mode'] == 'shard_map' and record['per_device_batch_in_program']
  seed = [r for r in lowered if 'imagenet64_res' in r['config']]  # the seed's 128 per GPU
  assert len(seed) == 5 and all(r['per_device_batch'] == [128, 64, 64, 3] for r in seed)


def test_cli_invalid_config_is_one_stderr_line_and_exit_2(tmp_path):
  """Bad values, a bad type, an unknown key: stderr is exactly one line, exit status 2, nothing written."""
  cases = [
      (['--config.sample.sampler=euler'],
       "ddjax: invalid config: sample.sampler='euler' is invalid; allowed: 'ddpm', 'ddim', 'dpm++2m'"),
      (['--config.data.num_classes=0', '--config.sample.guidance=1.0'],
       'ddjax: invalid config: sample.guidance=1.0 is invalid; allowed: 0 for an unconditional model '
       '(data.num_classes=0)'),
      (['--config.sample.step_size=2000'],
       'ddjax: invalid config: sample.step_size=2000 is invalid; allowed: None or 1..1000 (diffusion.num_timesteps)'),
      (['--config.data.image_size=7'],
       'ddjax: invalid config: data.image_size=7 is invalid; allowed: a multiple of 2**(model.num_levels-1) = 2 '
       'with model.num_levels=2'),
      (['--config.train.num_steps=abc'],
       "ddjax: invalid config: flag --config.train.num_steps=abc: invalid literal for int() with base 10: 'abc'"),
      (['--config.train.num_step=5'],
       'ddjax: invalid config: unknown key \'num_step\' Did you mean "num_steps" instead of "num_step"?'),
  ]
  workdir = tmp_path / 'workdir'
  # Concurrently: each is a second or two of imports.
  processes = [subprocess.Popen([sys.executable, '-m', 'ddjax.main', '--config', 'configs/digits.py', '--workdir',
                                 str(workdir), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for args, _ in cases]
  for (args, expected), process in zip(cases, processes):
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr.splitlines()) == (2, [expected]), args
  assert not workdir.exists()
