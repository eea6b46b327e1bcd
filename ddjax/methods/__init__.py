"""The training methods, named in one place: `config.method` picks one.

A method is a module with `validate(config, device_count)` (its own config keys, after the generic ones) and
`build(config) -> base.Method` (its state, pure train step, sampler and metrics, see base.Method). The loop in
train.py, `--mode sample` and `--mode eval` only ever see a Method.
"""
from ddjax.methods import ddgan, diffusion
from ddjax.methods.base import Method, TrainState
from ddjax.validation import check_choice

METHODS = {'diffusion': diffusion, 'ddgan': ddgan}


def validate(config, device_count: int) -> None:
  """The method's own keys, for a run on `device_count` devices."""
  check_choice('method', config.method, METHODS)
  METHODS[config.method].validate(config, device_count)


def build(config) -> Method:
  return METHODS[config.method].build(config)


def abstract_state(config) -> TrainState:
  """The TrainState's shapes and dtypes, computed without initialising anything: a restore template."""
  return build(config).abstract_state()
