"""One training run per workdir: an exclusive `flock` on `<workdir>/.lock`, held for the whole run; and the
config the run was started with, `<workdir>/config.json`.

The OS releases the lock when the process exits however it dies (SIGKILL included), so there is never a stale
lock to clean up. Only process 0 of a multi-host job takes it: all processes of one job share the workdir.
"""
import contextlib
import fcntl
import json
import os
import socket

import jax


class WorkdirError(Exception):
  """The workdir cannot be written, or another run holds it; `str()` is one line for the user."""


@contextlib.contextmanager
def lock(workdir: str, warn=print):
  """Creates `workdir` and holds its lock for the duration of the `with` block."""
  if jax.process_index() != 0:
    yield
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    handle = open(os.path.join(workdir, '.lock'), 'a+')
  except OSError as error:
    raise WorkdirError(f'cannot write to workdir {workdir}: {error.strerror or error}') from None
  with handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      raise WorkdirError(f'workdir {workdir} is in use by another training run ({handle.read().strip()}); wait for '
                         'it to end or use another --workdir') from None
    except OSError as error:  # a file system without flock (some NFS/Lustre mounts): run, but say so
      warn(f'warning: cannot lock {workdir} ({error.strerror}); make sure no other run trains in it')
    handle.truncate(0)
    handle.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    handle.flush()
    yield


CONFIG_FILE = 'config.json'


def flat_config(config) -> dict:
  """{'section.key': JSON value} of a ConfigDict (tuples as lists, placeholders as None)."""
  def flatten(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  return dict(flatten(json.loads(config.to_json_best_effort()), ''))


def read_config(workdir: str) -> dict | None:
  """The flat config saved in `workdir`, or None when there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_config(workdir: str, config) -> None:
  """Saves the flat config as `<workdir>/config.json` (process 0, atomically)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(flat_config(config), f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)
