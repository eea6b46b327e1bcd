"""Orbax checkpoints of the whole TrainState under `<workdir>/checkpoints`."""
import os

import orbax.checkpoint as ocp


class CheckpointNotFoundError(FileNotFoundError):
  """No (or no such) checkpoint in the workdir."""


def create_manager(workdir: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """Async CheckpointManager keeping the newest `keep` steps (orbax runs the multi-host protocol itself)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Start an async save of `state` at `step` (returns once the arrays are copied off the devices)."""
  manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, template, step: int | None = None):
  """The state saved at `step` (newest when None), with the structure and dtypes of `template`."""
  steps = manager.all_steps()
  if not steps:
    raise CheckpointNotFoundError(f'no checkpoint in {manager.directory}; train first (--mode train)')
  step = max(steps) if step is None else step
  if step not in steps:
    raise CheckpointNotFoundError(f'sample.checkpoint_step={step}: no such checkpoint in {manager.directory}; '
                                  f'available steps: {sorted(steps)}')
  return manager.restore(step, args=ocp.args.StandardRestore(template))
