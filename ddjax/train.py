"""Training: the TrainState, the pure train step, and `train_and_evaluate`."""
import contextlib
import copy
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers
from jax.experimental import multihost_utils

from ddjax import checkpoint, config as config_lib, data, diffusion, generate, parallel, schedules
from ddjax import workdir as workdir_lib
from ddjax.models import create_model
from ddjax.validation import ConfigError


class TrainState(flax.struct.PyTreeNode):
  """Everything a checkpoint holds. The data position is `step` (the pipeline resumes from it)."""
  step: jnp.ndarray      # int32 number of updates done
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jnp.ndarray       # uint32 key data (raw, so orbax stores it like any array)


# ----------------------------------------------------------------------------------------------------------------
# State and optimizer
# ----------------------------------------------------------------------------------------------------------------

def learning_rate_schedule(train_config):
  """The rate of update n (0-based): lr·min(1, (n + 1) / warmup_steps), so the first update already moves (at
  lr / warmup_steps; at the full rate when warmup_steps is 0) and update warmup_steps − 1 reaches lr."""
  base, warmup = train_config.learning_rate, max(train_config.warmup_steps, 1)
  return lambda count: base * jnp.minimum(1.0, (count + 1.0) / warmup)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant rate, after global-norm gradient clipping (off when grad_clip 0)."""
  adamw = optax.adamw(learning_rate_schedule(train_config), weight_decay=train_config.weight_decay)
  if train_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw)
  return adamw


def init_params(config, model, rng):
  size, channels = config.data.image_size, config.data.num_channels
  labels = jnp.zeros((1,), jnp.int32) if config.data.num_classes else None
  return model.init({'params': rng}, jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32), labels,
                    train=False)['params']


def create_train_state(config, model, tx) -> TrainState:
  """The initial state, computed as one compiled program (run op by op, a U-Net's init compiles hundreds of
  small programs: ~20 s of a CPU start-up). Every leaf is its own buffer, the EMA too: the step donates the
  state, and one buffer cannot be donated twice."""
  def initial_state():
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    params = init_params(config, model, init_rng)
    return TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(train_rng))
  return jax.jit(initial_state)()


def abstract_train_state(config, model) -> TrainState:
  """The TrainState's shapes and dtypes, computed without initialising anything: a restore template."""
  return jax.eval_shape(lambda: create_train_state(config, model, make_optimizer(config.train)))


def ema_decay_at(step, ema_decay: float):
  """EMA warm-up: min(decay, (1 + step) / (10 + step)), so early averages are not dominated by the init."""
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


# ----------------------------------------------------------------------------------------------------------------
# The train step (pure; one device's shard of the batch; collectives over `axis_name`)
# ----------------------------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch, *, model, tx, schedule, prediction, variance, loss, hybrid_lambda,
               num_classes, p_uncond, ema_decay, grad_accum_steps=1, axis_name=None):
  """One AdamW update on the diffusion loss; returns (new state, metrics averaged over all devices).

  Randomness: per-example keys folded from (state rng, step, global example index), so t, ε and label dropout
  do not depend on how the global batch is split over devices or micro-batches; dropout masks use a key per
  device and micro-batch. With grad_accum_steps k the device's batch is processed as k micro-batches whose
  gradients are averaged: the same update as one batch, at 1/k of the activation memory.
  """
  images, labels = batch['image'], batch['label']
  local_batch = images.shape[0]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  example_root, dropout_root = jax.random.split(step_key)
  first_example = parallel.device_index(axis_name) * local_batch
  example_keys = jax.vmap(lambda i: jax.random.fold_in(example_root, i))(first_example + jnp.arange(local_batch))
  t_keys, eps_keys, drop_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(example_keys), 1, 0)
  num_steps = schedule.num_steps
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_steps))(t_keys)
  eps = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(eps_keys)
  if num_classes:  # classifier-free guidance: train the null class on a p_uncond fraction
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, p_uncond))(drop_keys)
    labels = jnp.where(drop, num_classes, labels)
  examples = {'x0': images, 'x_t': diffusion.q_sample(schedule, x0=images, t=t, eps=eps), 't': t, 'eps': eps,
              'labels': labels if num_classes else None}
  dropout_key = jax.random.fold_in(dropout_root, parallel.device_index(axis_name))

  def loss_fn(params, micro, micro_index):
    output = model.apply({'params': params}, micro['x_t'], micro['t'], micro['labels'], train=True,
                         rngs={'dropout': jax.random.fold_in(dropout_key, micro_index)})
    terms = diffusion.training_losses(schedule, output.astype(jnp.float32), x0=micro['x0'], x_t=micro['x_t'],
                                      t=micro['t'], eps=micro['eps'], prediction=prediction, variance=variance,
                                      loss=loss, hybrid_lambda=hybrid_lambda)
    return jnp.mean(terms['loss']), terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (_, terms), grads = grad_fn(state.params, examples, 0)
  else:
    micro_batches = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), examples)

    def accumulate(grad_sum, micro_and_index):
      (_, micro_terms), micro_grads = grad_fn(state.params, *micro_and_index)
      return jax.tree.map(jnp.add, grad_sum, micro_grads), micro_terms

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grad_sum, terms = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(grad_accum_steps)))
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
    terms = jax.tree.map(lambda x: x.reshape(local_batch), terms)
  mean = functools.partial(jax.lax.pmean, axis_name=axis_name) if axis_name else (lambda x: x)
  grads = mean(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

  # Loss by timestep quartile (IDDPM): sums and counts reduced over devices, then divided.
  quartile = t * 4 // num_steps
  sums = mean(jnp.zeros(4).at[quartile].add(terms['loss']))
  counts = mean(jnp.zeros(4).at[quartile].add(1.0))
  metrics = {name: mean(jnp.mean(value)) for name, value in terms.items()}
  metrics.update({f'loss_q{q}': sums[q] / jnp.maximum(counts[q], 1e-9) for q in range(4)})
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['param_norm'] = optax.global_norm(params)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state)
  return new_state, metrics


def bind_train_step(config, model, tx, schedule):
  """train_step(state, batch, *, axis_name) with the config's fixed dependencies bound."""
  return functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, prediction=config.diffusion.prediction,
      variance=config.diffusion.variance, loss=config.diffusion.loss, hybrid_lambda=config.diffusion.hybrid_lambda,
      num_classes=config.data.num_classes, p_uncond=config.train.p_uncond, ema_decay=config.train.ema_decay,
      grad_accum_steps=config.train.grad_accum_steps)


def should_run(step: int, every: int, last_step: int) -> bool:
  """Periodic actions (log, checkpoint, sample) after update `step` (1-based), and always at the last step."""
  return step == last_step or (every > 0 and step % every == 0)


# ----------------------------------------------------------------------------------------------------------------
# Metrics: clu writer (TensorBoard) + metrics.jsonl, process 0 only
# ----------------------------------------------------------------------------------------------------------------

class MetricLog:
  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.enabled, asynchronous=False)
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a') if self.enabled else None

  def write(self, step: int, scalars: dict):
    self.writer.write_scalars(step, scalars)
    if self.jsonl:
      self.jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}}) + '\n')
      self.jsonl.flush()

  def close(self):
    self.writer.close()
    if self.jsonl:
      self.jsonl.close()


def console(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)


def format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


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


def check_finite(host_metrics: list, first_step: int, manager):
  """FloatingPointError naming the first step (host_metrics[i] is step first_step + i) whose loss, gradient or
  parameters are not finite. Called before every log and save, so no non-finite state is ever saved."""
  for step, metrics in enumerate(host_metrics, first_step):
    for key in ('loss', 'grad_norm', 'param_norm'):
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
SAFE_PREFIXES = ('sample.', 'eval.', 'sweep.', 'parallel.mode', 'data.data_dir', 'train.num_steps',
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
# train_and_evaluate
# ----------------------------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str):
  """Train `config` in `workdir`, resuming from its newest intact checkpoint; writes metrics, checkpoints, samples.

  Holds the workdir lock and a SIGTERM handler for the run. Raises Preempted after saving on SIGTERM,
  FloatingPointError (having saved nothing since) on a non-finite loss, gradient or parameter, and ConfigError,
  WorkdirError, CheckpointError or DatasetNotFoundError, each with a one-line message.
  """
  config_lib.validate(config)  # before anything is written, built or compiled
  with workdir_lib.lock(workdir, warn=console), sigterm_flag() as sigterm:
    return _train(config, workdir, sigterm)


def _train(config, workdir: str, sigterm: threading.Event):
  # -- Setup. -------------------------------------------------------------------------------------------------
  # -- The config against the one the checkpoints continue, before anything is written.
  manager = checkpoint.create_manager(workdir, keep=config.train.keep_checkpoints)
  saved_config = workdir_lib.read_config(workdir)
  if manager.all_steps() and saved_config is not None:
    for line in check_resume_config(config, saved_config, lambda c: abstract_train_state(c, create_model(c))):
      console(f'resuming with a changed setting: {line}')
  else:  # a fresh start (or a workdir from before config.json): this is the config its checkpoints continue
    workdir_lib.write_config(workdir, config)

  model = create_model(config)
  betas = schedules.get_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
  schedule = schedules.make_schedule(betas)
  mapper = parallel.DataParallel.create(config.parallel.mode)
  tx = make_optimizer(config.train)
  log = MetricLog(workdir)
  num_steps = config.train.num_steps

  # -- State: resume order is (1) the newest checkpoint in workdir that restores intact (newer broken ones are
  # moved aside, with a warning), (2) fresh init. The state holds step and RNG; the data position is the step.
  state = create_train_state(config, model, tx)
  restored = checkpoint.resume(manager, state, warn=console)
  if restored is not None:
    state = restored
    console(f'resumed from {manager.directory} at step {int(state.step)}')
  start_step = int(state.step)
  param_count = sum(x.size for x in jax.tree.leaves(state.params))
  console(f'{config.model.name}: {param_count:,} parameters; {jax.device_count()} devices '
          f'({jax.default_backend()}, {config.parallel.mode}); global batch {config.data.batch_size}')

  batches = parallel.prefetch(data.create_dataset(config, start_step=start_step), mapper.shard_batch)
  step_fn = mapper.map(bind_train_step(config, model, tx, schedule))
  generate_fn = generate.make_generate_fn(config, model, betas, mapper.mesh)
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
      check_finite(host_metrics, step + 1 - len(host_metrics), manager)

    if log_now:
      scalars = {k: float(np.mean([m[k] for m in host_metrics])) for k in host_metrics[0]}
      pending_metrics = []
      now = time.time()
      scalars['steps_per_sec'] = (step - last_log_step) / (now - last_log_time)
      scalars['learning_rate'] = float(learning_rate_schedule(config.train)(step - 1))  # what update `step` used
      log.write(step, scalars)
      eta = (num_steps - step) / max(scalars['steps_per_sec'], 1e-9)
      console(f'step {step}/{num_steps}  loss {scalars["loss"]:.4f}  {scalars["steps_per_sec"]:.2f} steps/s  '
              f'ETA {format_seconds(eta)}')
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
        generate.save_grid(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), images,
                           columns=grid_columns(config), scale=grid_scale(config))

  checkpoint.wait(manager)
  log.close()
  console(f'done in {format_seconds(time.time() - loop_start)}: checkpoints in {manager.directory}, metrics in '
          f'{os.path.join(workdir, "metrics.jsonl")}, samples in {os.path.join(workdir, "samples")}')
  return mapper.unreplicate(replicated)


MAX_GRID_COLUMNS = 16


def grid_columns(config) -> int:
  """One class per column when class-conditional (classes cycling when there are more than 16), else a
  square-ish grid; never more than 16 columns, so a 1000-class grid is not one row 65,000 px wide."""
  wanted = config.data.num_classes or int(np.ceil(np.sqrt(config.sample.num_samples)))
  return min(wanted, MAX_GRID_COLUMNS)


def grid_scale(config) -> int:
  """Upscale small images so a grid is legible (8×8 digits -> 32×32 per cell)."""
  return max(1, 32 // config.data.image_size)
