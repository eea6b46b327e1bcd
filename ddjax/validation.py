"""One-line argument and config checks, raised before anything is traced or compiled.

Every message names the key (or argument), the offending value and what is allowed, so a bad setting reads
as one line on the console instead of an XLA traceback.
"""
from collections.abc import Iterable


class ConfigError(ValueError):
  """An invalid argument or config value; `str()` is the one-line message for the user."""


def fail(key: str, value, allowed: str):
  raise ConfigError(f'{key}={value!r} is invalid; allowed: {allowed}')


def check_choice(key: str, value, allowed: Iterable[str]):
  allowed = tuple(allowed)
  if value not in allowed:
    fail(key, value, ', '.join(repr(a) for a in allowed))


def check(condition: bool, key: str, value, allowed: str):
  if not condition:
    fail(key, value, allowed)


def check_types(config, types: dict):
  """Each key of `types` ({allowed: (Python types, 'key key ...')}) present in `config` with one of its types, so
  that a wrong type is one line, not a TypeError in a comparison later."""
  for allowed, (python_types, keys) in types.items():
    for key in keys.split():
      section, name = key.rpartition('.')[::2]
      if section and section not in config or name not in (config[section] if section else config):
        fail(key, None, f'{allowed} (the key is missing from the config)')
      value = config[section][name] if section else config[name]
      # A bool is an int to Python, never to a config.
      check(isinstance(value, python_types) and (bool in python_types or not isinstance(value, bool)), key,
            value, allowed)
