"""`python -m ddjax.main` with one fault injected at one step, for tests/test_reliability.py:

  python -m tests.faults FAULT STEP [ddjax.main flags ...]

FAULT is one of
  kill_at_step     SIGKILL when the batch of STEP is read (the input runs a step or two ahead), once the saves begun
                   so far have completed (a crash between checkpoints)
  kill_in_save     SIGKILL while the checkpoint at STEP is being committed (a crash during a save)
  disk_full        committing the checkpoint at STEP fails with ENOSPC (a full disk)
  nan_batch        the batch of STEP is all NaN (a loss that becomes non-finite)
  sigterm_at_step  SIGTERM to itself when the batch of STEP is read (a preemption notice; the run stops at the
                   step it is at, a step or two before STEP)

The faults patch what ddjax calls (its checkpoint.save, its data pipeline) or orbax's commit of a save, so
everything else is the real program.
"""
import errno
import os
import signal
import sys

import numpy as np
from absl import app
from orbax.checkpoint.path import atomicity

from ddjax import checkpoint, data, main


def inject(fault: str, at_step: int, patch=setattr):
  """Injects `fault` at `at_step` by patch(owner, name, replacement) (a test passes monkeypatch.setattr, which undoes
  it afterwards)."""
  if fault == 'kill_at_step':
    managers = []
    save, create_dataset = checkpoint.save, data.create_dataset

    def remembering_save(manager, step, state):
      managers.append(manager)
      save(manager, step, state)

    def killing_dataset(config, *, start_step=0, **kwargs):
      for step, batch in enumerate(create_dataset(config, start_step=start_step, **kwargs), start_step + 1):
        if step == at_step:
          for manager in managers:
            manager.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)
        yield batch

    patch(checkpoint, 'save', remembering_save)
    patch(data, 'create_dataset', killing_dataset)
  elif fault in ('kill_in_save', 'disk_full'):
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def failing_finalize(self, *args, **kwargs):  # the rename that commits a written save
      if self.get_final().name == str(at_step):
        if fault == 'kill_in_save':
          os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return await finalize(self, *args, **kwargs)

    patch(atomicity.AtomicRenameTemporaryPath, 'finalize', failing_finalize)
  elif fault == 'nan_batch':
    create_dataset = data.create_dataset

    def with_nan_batch(config, *, start_step=0, **kwargs):
      for step, batch in enumerate(create_dataset(config, start_step=start_step, **kwargs), start_step + 1):
        yield dict(batch, image=np.full_like(batch['image'], np.nan)) if step == at_step else batch

    patch(data, 'create_dataset', with_nan_batch)
  elif fault == 'sigterm_at_step':
    create_dataset = data.create_dataset

    def preempting_dataset(config, *, start_step=0, **kwargs):
      for step, batch in enumerate(create_dataset(config, start_step=start_step, **kwargs), start_step + 1):
        if step == at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch

    patch(data, 'create_dataset', preempting_dataset)
  else:
    raise ValueError(f'unknown fault {fault!r}')


if __name__ == '__main__':
  inject(sys.argv[1], int(sys.argv[2]))
  app.run(main.main, argv=[sys.argv[0], *sys.argv[3:]], flags_parser=main.parse_flags)
