"""Orbax checkpoints of the whole TrainState under `<workdir>/checkpoints`, verified on restore.

A save is atomic (orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete) and records a CRC32 of
every array, because orbax restores flipped bytes inside an array's data without complaint. Training resumes
from the newest checkpoint that restores and matches its CRC; newer broken ones are moved out of the way.
"""
import contextlib
import errno
import logging
import os
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for a save that never completed
_CRC_KEY = 'ddjax_crc32'
READ_ATTEMPTS = 3  # a read that fails with an I/O error is retried (1 s, then 2 s later) before giving up
# Errors of the storage, not of the checkpoint's content: retried, and never a reason to move a checkpoint aside.
_STORAGE_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EACCES,
                   errno.EPERM, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET, errno.EHOSTUNREACH}
_STORAGE_MESSAGES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'Input/output error', 'Stale file handle')  # tensorstore


class CheckpointError(Exception):
  """A checkpoint that is missing, unreadable, or could not be written; `str()` is one line for the user."""


class CheckpointNotFoundError(CheckpointError):
  """No (or no such) checkpoint in the workdir."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint that fails to restore or does not match the CRC recorded when it was saved."""


class CheckpointReadError(CheckpointError):
  """Reading a checkpoint failed with a storage error (EIO, a stale mount, a permission) on every attempt; it may
  well be intact, so nothing is moved."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (a full disk, a lost mount); the checkpoints before it are untouched."""


def create_manager(workdir: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """Async CheckpointManager keeping the newest `keep` steps (orbax runs the multi-host protocol itself).

  Orbax deletes the oldest step only after a newer save has completed, and ddjax saves only finite states, so
  keeping N never leaves zero good checkpoints.
  """
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not read_only:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep))
  # Only the options a reader has (orbax warns about each save option it must drop), and without orbax's warning
  # that the directory is read only, which is what was asked for.
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
                                         enable_async_checkpointing=False)
  with _dropped_log_message(READ_ONLY_NOTICE):
    return ocp.CheckpointManager(directory, options=options)


READ_ONLY_NOTICE = 'Given directory is read only=%s'  # orbax's absl warning, verbatim


@contextlib.contextmanager
def _dropped_log_message(message: str):
  """absl log records whose format string is `message` dropped within the block; every other record shows."""
  logger = logging.getLogger('absl')
  keep = lambda record: record.msg != message  # noqa: E731
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


@contextlib.contextmanager
def opened(workdir: str, **options):
  """create_manager(workdir, **options), closed (its saves waited for, its threads ended) when the block ends. When
  the block raises, that error is the one reported, not one of closing."""
  manager = create_manager(workdir, **options)
  try:
    yield manager
  except BaseException:
    with contextlib.suppress(Exception):
      manager.close()
    raise
  with _save_errors(manager):
    manager.close()


def _crc32(state) -> int:
  """CRC32 of every array's bytes, in tree order."""
  crc = 0
  for leaf in jax.tree.leaves(jax.device_get(state)):
    crc = zlib.crc32(np.ascontiguousarray(leaf).data, crc)
  return crc


@contextlib.contextmanager
def _save_errors(manager):
  """OSError from a save (raised by the save itself, or by the next wait for an async one) -> one line."""
  try:
    yield
  except OSError as error:
    raise CheckpointSaveError(f'writing a checkpoint to {manager.directory} failed ({error}); the checkpoints '
                              f'saved before it are untouched') from None


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Start an async save of `state` at `step`, after the previous save has completed."""
  with _save_errors(manager):
    manager.save(step, args=ocp.args.StandardSave(state), custom_metadata={_CRC_KEY: _crc32(state)})


def wait(manager: ocp.CheckpointManager) -> None:
  """Block until the last save has completed (is renamed into place)."""
  with _save_errors(manager):
    manager.wait_until_finished()


def _is_storage_error(error: Exception) -> bool:
  if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
    return True
  return isinstance(error, (TimeoutError, ConnectionError)) or any(m in str(error) for m in _STORAGE_MESSAGES)


def _restore_step(manager, template, step: int):
  for attempt in range(READ_ATTEMPTS):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(template))
      recorded = manager.metadata(step).custom_metadata.get(_CRC_KEY)
      break
    except Exception as error:  # a truncated or garbled checkpoint fails anywhere in orbax, tensorstore or json
      reason = ' '.join(str(error).split())[:200] or type(error).__name__
      if not _is_storage_error(error):
        raise CheckpointCorruptError(f'checkpoint {step} in {manager.directory} cannot be restored: {reason}') from None
      if attempt == READ_ATTEMPTS - 1:
        raise CheckpointReadError(f'checkpoint {step} in {manager.directory} could not be read in {READ_ATTEMPTS} '
                                  f'attempts ({reason}); nothing was moved: check the file system and run again'
                                  ) from None
      time.sleep(2 ** attempt)
  if recorded != _crc32(state):
    raise CheckpointCorruptError(f'checkpoint {step} in {manager.directory} is corrupt: its data does not match '
                                 f'the CRC32 recorded when it was saved')
  return state


def restore(manager: ocp.CheckpointManager, template, step: int | None = None):
  """The state saved at `step` (newest when None), with the structure and dtypes of `template`."""
  steps = sorted(manager.all_steps())
  if not steps:
    raise CheckpointNotFoundError(f'no checkpoint in {manager.directory}; train first (--mode train)')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise CheckpointNotFoundError(f'sample.checkpoint_step={step}: no such checkpoint in {manager.directory}; '
                                  f'available steps: {steps}')
  try:
    return _restore_step(manager, template, step)
  except CheckpointCorruptError as error:
    others = [s for s in steps if s != step]
    raise CheckpointCorruptError(f'{error}; other steps: {others} (pick one with --config.sample.checkpoint_step)'
                                 if others else str(error)) from None


def _from_process_0(value: int) -> int:
  """Process 0's `value` on every process, so that all restore the same step even when their views of a shared
  file system differ for a moment."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def resume(manager: ocp.CheckpointManager, template, warn):
  """The newest checkpoint that restores intact, or None when there is none at all.

  Process 0 decides: every process tries the steps process 0 lists, newest first, and takes process 0's verdict
  on each. Broken checkpoints newer than the one restored, and saves that never completed, are reported through
  `warn(line)`. The broken ones are moved to `<workdir>/checkpoints.corrupt/` (kept for inspection): left in
  place they would stop orbax from saving any step up to theirs, and a step directory is never saved over. A
  storage error (CheckpointReadError) stops the search with nothing moved.
  """
  for name in sorted(os.listdir(manager.directory)):
    if _TMP_SUFFIX in name:  # orbax deletes it when that step is saved again
      warn(f'warning: ignoring {os.path.join(manager.directory, name)}: a save that was interrupted')
  steps = sorted(manager.all_steps(), reverse=True)
  broken = []
  for index in range(_from_process_0(len(steps))):
    step = _from_process_0(steps[index] if index < len(steps) else -1)
    try:
      state, error = _restore_step(manager, template, step), None
    except CheckpointCorruptError as corrupt:
      state, error = None, corrupt
    if not _from_process_0(error is None):
      broken.append((step, error or CheckpointCorruptError(f'checkpoint {step} is broken on process 0')))
      continue
    if error is not None:
      raise CheckpointReadError(f'process {jax.process_index()} cannot restore checkpoint {step}, which process 0 '
                                f'restored: {error}')
    _move_aside(manager, broken, warn)
    return state
  if broken:
    raise CheckpointCorruptError(f'no checkpoint in {manager.directory} restores intact (newest: {broken[0][1]}); '
                                 f'move them away to start from scratch')
  return None


def _move_aside(manager, broken, warn):
  """Moves the broken steps out of the checkpoint directory (process 0; the others wait) and reloads."""
  if not broken:
    return
  aside = os.path.join(os.path.dirname(manager.directory), 'checkpoints.corrupt')
  for step, error in broken:
    destination = os.path.join(aside, f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
    warn(f'warning: {error}; moved it to {destination}')
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      os.rename(os.path.join(manager.directory, str(step)), destination)
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes('ddjax_checkpoints_moved_aside')
  manager.reload()
