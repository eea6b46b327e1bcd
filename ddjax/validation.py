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
