"""Training: `train_and_evaluate`, the one loop for every method (ddjax.methods), and its helpers."""
import contextlib
import copy
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from ddjax import checkpoint, config as config_lib, data, generate, image_files, methods, parallel, reporting
from ddjax import workdir as workdir_lib
from ddjax.validation import ConfigError


# ----------------------------------------------------------------------------------------------------------------
# The loop's helpers. The loop itself knows nothing of the method: a methods.Method supplies the state, the pure
# train step, the sampler and what to watch and show.
# ----------------------------------------------------------------------------------------------------------------

def should_run(step: int, every: int, last_step: int) -> bool:
  """Periodic actions (log, checkpoint, sample) after update `step` (1-based), and always at the last step."""
  return step == last_step or (every > 0 and step % every == 0)


# ----------------------------------------------------------------------------------------------------------------
# Stopping safely: preemption (SIGTERM) and non-finite values
# ----------------------------------------------------------------------------------------------------------------

class Preempted(Exception):
  """Training stopped on SIGTERM after its checkpoint at the current step was saved; `str()` is one line."""


@contextlib.contextmanager
def sigterm_flag():
  """An Event that SIGTERM sets while the block runs; the loop polls it, the handler does nothing else."""
  sigterm = threading.Event()
  if jax.process_count() > 1:  # JAX's preemption notifier owns SIGTERM there (see preemption_requested)
    yield sigterm
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: sigterm.set())
  try:
    yield sigterm
  finally:
    signal.signal(signal.SIGTERM, previous)


def preemption_requested(step: int, sigterm: threading.Event) -> bool:
  """Whether to save and stop after `step`; called after every step.

  Every process must stop at the same step. One process reads its flag. A multi-host job asks JAX's preemption
  sync point instead: the coordination service hears a SIGTERM on any host and picks one step (the highest step
  any host has reached, plus one) at which this returns True on every host.
  """
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point(step)
  return sigterm.is_set()


def check_finite(host_metrics: list, first_step: int, manager, keys):
  """FloatingPointError naming the first step (host_metrics[i] is step first_step + i) whose metric in `keys`
  (losses, gradient and parameter norms) is not finite. Called before every log and save, so no non-finite state
  is ever saved."""
  for step, metrics in enumerate(host_metrics, first_step):
    for key in keys:
      if not np.isfinite(metrics[key]):
        latest = manager.latest_step()
        kept = 'no checkpoint was saved' if latest is None else f'the last good checkpoint (step {latest}) is kept'
        raise FloatingPointError(f'non-finite {key} ({metrics[key]}) at step {step}; stopped without saving: {kept} '
                                 f'in {manager.directory}')


# ----------------------------------------------------------------------------------------------------------------
# Resuming with a changed config
# ----------------------------------------------------------------------------------------------------------------

# Keys that resume would silently get wrong: the data position is replayed from the step, so these must keep the
# values the run started with. Changes to the state's structure are found by building it (see below).
DATA_ORDER_KEYS = ('seed', 'data.dataset', 'data.batch_size', 'data.num_shards', 'data.shuffle_buffer',
                   'data.random_flip', 'data.image_size', 'data.num_channels')
# Sections and keys that neither the state nor the data order depend on: never checked further.
SAFE_PREFIXES = ('weights', 'sample.', 'eval.', 'sweep.', 'parallel.mode', 'data.data_dir', 'train.num_steps',
                 'train.log_every', 'train.checkpoint_every', 'train.sample_every', 'train.keep_checkpoints')


def _state_signature(config, abstract_state):
  state = abstract_state(config)
  return jax.tree.structure(state), [(x.shape, x.dtype) for x in jax.tree.leaves(state)]


def check_resume_config(config, saved: dict, abstract_state) -> list[str]:
  """The keys changed since `saved` (the flat config.json), as 'key: old -> new' lines, when resuming is sound.

  A ConfigError names every changed key that alters the data order (DATA_ORDER_KEYS) or the structure of the
  state (found by building the abstract state with that one key set back to its saved value:
  `abstract_state(config)` -> a pytree of ShapeDtypeStructs), so a checkpoint is never misread as corrupt.
  Keys present on one side only (a newer ddjax) are not compared.
  """
  current = workdir_lib.flat_config(config)
  changed = [k for k in sorted(current) if k in saved and saved[k] != current[k]]
  suspicious = [k for k in changed if not k.startswith(SAFE_PREFIXES)]
  reference = _state_signature(config, abstract_state) if suspicious else None

  def alters_state(key):
    old = copy.deepcopy(config)
    section, _, name = key.rpartition('.')
    try:
      (old[section] if section else old)[name] = saved[key]
      return _state_signature(old, abstract_state) != reference
    except Exception:  # an old value the current config cannot even hold or build: not resumable
      return True

  blocking = [k for k in suspicious if k in DATA_ORDER_KEYS or alters_state(k)]
  if blocking:
    what = ', '.join(f'{k} {saved[k]!r} -> {current[k]!r}' for k in blocking)
    raise ConfigError(f'{what}: changed since this workdir\'s run started ({workdir_lib.CONFIG_FILE}), which '
                      'changes the train state or the data order its checkpoints continue; use the original '
                      'values or a new --workdir')
  return [f'{k}: {saved[k]!r} -> {current[k]!r}' for k in changed]


# ----------------------------------------------------------------------------------------------------------------
# The compiled programs, kept for the next run in this process
# ----------------------------------------------------------------------------------------------------------------

# Keys that only the loop reads (no method, network or sampler does): runs that differ in nothing else, such as a
# run and its resume to more steps, use the same programs.
LOOP_KEYS = ('data.data_dir', 'train.num_steps', 'train.log_every', 'train.checkpoint_every', 'train.sample_every',
             'train.keep_checkpoints')


@dataclasses.dataclass(frozen=True)
class Programs:
  """A config's method with its train step and sampler mapped over every device."""
  method: methods.Method
  mapper: parallel.DataParallel
  step_fn: Callable      # (replicated state, sharded batch) -> (state, metrics), donating the state
  generate_fn: Callable  # generate.make_generate_fn of the method's sampler


_latest_programs: dict[str, Programs] = {}


def programs(config) -> Programs:
  """The Programs of `config`, built anew only when the previous call's config differed outside LOOP_KEYS: a second
  run in the same process (a resume, a longer run, a notebook's rerun) traces and compiles nothing again. Only the
  newest are kept, so a process that trains many configs does not accumulate executables."""
  key = json.dumps({k: v for k, v in workdir_lib.flat_config(config).items() if k not in LOOP_KEYS}, sort_keys=True)
  if key not in _latest_programs:
    method = methods.build(config)
    mapper = parallel.DataParallel.create(config.parallel.mode)
    _latest_programs.clear()
    _latest_programs[key] = Programs(method, mapper, mapper.map(method.train_step),
                                     generate.make_generate_fn(method.sample_fn, mapper.mesh))
  return _latest_programs[key]


# ----------------------------------------------------------------------------------------------------------------
# train_and_evaluate
# ----------------------------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str):
  """Train `config` in `workdir`, resuming from its newest intact checkpoint; writes metrics, checkpoints, samples.

  Holds the workdir lock and a SIGTERM handler for the run. Raises Preempted after saving on SIGTERM,
  FloatingPointError (having saved nothing since) on a non-finite loss, gradient or parameter, and ConfigError,
  WorkdirError, CheckpointError or DatasetNotFoundError, each with a one-line message.
  """
  config_lib.validate(config)  # before anything is written, built or compiled
  with (workdir_lib.lock(workdir, warn=reporting.console), sigterm_flag() as sigterm,
        checkpoint.opened(workdir, keep=config.train.keep_checkpoints) as manager):
    return _train(config, workdir, manager, sigterm)


def _train(config, workdir: str, manager, sigterm: threading.Event):
  # -- Setup. -------------------------------------------------------------------------------------------------
  # -- The config against the one the checkpoints continue, before anything is written.
  saved_config = workdir_lib.read_config(workdir)
  if manager.all_steps() and saved_config is not None:
    for line in check_resume_config(config, saved_config, methods.abstract_state):
      reporting.console(f'resuming with a changed setting: {line}')
  else:  # a fresh start (or a workdir from before config.json): this is the config its checkpoints continue
    workdir_lib.write_config(workdir, config)

  built = programs(config)
  method, mapper, step_fn, generate_fn = built.method, built.mapper, built.step_fn, built.generate_fn
  log = reporting.MetricLog(workdir)
  num_steps = config.train.num_steps

  # -- State: resume order is (1) the newest checkpoint in workdir that restores intact (newer broken ones are
  # moved aside, with a warning), (2) fresh init. The state holds step and RNG; the data position is the step.
  state = method.initial_state()
  restored = checkpoint.resume(manager, state, warn=reporting.console)
  if restored is not None:
    state = restored
    reporting.console(f'resumed from {manager.directory} at step {int(state.step)}')
  start_step = int(state.step)
  counts = ', '.join(f'{name} {count:,}' for name, count in method.parameter_counts(state.params).items())
  reporting.console(f'{config.method} ({counts} parameters); {jax.device_count()} devices ({jax.default_backend()}, '
          f'{config.parallel.mode}); global batch {config.data.batch_size}')

  batches = parallel.prefetch(data.create_dataset(config, start_step=start_step), mapper.shard_batch)
  replicated = mapper.replicate(state)

  # -- Loop. --------------------------------------------------------------------------------------------------
  pending_metrics = []
  last_log_time, last_log_step, loop_start = time.time(), start_step, time.time()
  for step in range(start_step + 1, num_steps + 1):
    replicated, metrics = step_fn(replicated, next(batches))
    pending_metrics.append(metrics)
    preempted = preemption_requested(step, sigterm)
    save_now = preempted or should_run(step, config.train.checkpoint_every, num_steps)
    log_now = should_run(step, config.train.log_every, num_steps)

    if save_now or log_now:
      # Non-finite check on the host before every log and save only: no sync in the hot path.
      host_metrics = jax.device_get([mapper.unreplicate(m) for m in pending_metrics])
      check_finite(host_metrics, step + 1 - len(host_metrics), manager, method.watched_metrics)

    if log_now:
      scalars = {k: float(np.mean([m[k] for m in host_metrics])) for k in host_metrics[0]}
      pending_metrics = []
      now = time.time()
      scalars['steps_per_sec'] = (step - last_log_step) / (now - last_log_time)
      scalars.update(method.learning_rates(step - 1))  # what update `step` used
      log.write(step, scalars)
      eta = (num_steps - step) / max(scalars['steps_per_sec'], 1e-9)
      shown = ''.join(f'{key} {scalars[key]:.4f}  ' for key in method.console_metrics)
      reporting.console(f'step {step}/{num_steps}  {shown}{scalars["steps_per_sec"]:.2f} steps/s  ETA {reporting.format_seconds(eta)}')
      last_log_time, last_log_step = now, step

    if save_now:
      checkpoint.save(manager, step, mapper.unreplicate(replicated))
    if preempted:
      checkpoint.wait(manager)
      raise Preempted(f'preempted (SIGTERM) at step {step}: saved checkpoint {step} in {manager.directory}; run '
                      f'the same command again to resume')

    if should_run(step, config.train.sample_every, num_steps):  # every process samples; process 0 writes
      ema_params = mapper.unreplicate(replicated.ema_params)
      images, _ = generate.generate_images(
          generate_fn, ema_params, jax.random.fold_in(jax.random.key(config.seed), step), mesh=mapper.mesh,
          num_samples=config.sample.num_samples, batch_size=config.sample.batch_size,
          num_classes=config.data.num_classes, cycle_classes=True)
      if jax.process_index() == 0:
        image_files.save_grid(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), images,
                              columns=generate.grid_columns(config), scale=generate.grid_scale(config))

  checkpoint.wait(manager)
  log.close()
  reporting.console(f'done in {reporting.format_seconds(time.time() - loop_start)}: checkpoints in {manager.directory}, metrics in '
          f'{os.path.join(workdir, "metrics.jsonl")}, samples in {os.path.join(workdir, "samples")}')
  return mapper.unreplicate(replicated)
