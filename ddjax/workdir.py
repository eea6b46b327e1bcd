"""One training run per workdir: an exclusive `flock` on `<workdir>/.lock`, held for the whole run.

The OS releases the lock when the process exits however it dies (SIGKILL included), so there is never a stale
lock to clean up. Only process 0 of a multi-host job takes it: all processes of one job share the workdir.
"""
import contextlib
import fcntl
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
