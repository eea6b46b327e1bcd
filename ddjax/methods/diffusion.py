"""Gaussian diffusion (DDPM / IDDPM / DDIM / CFG / v-prediction) as a training method: its config checks, its
optimizer and state, its pure train step, its sampler and its likelihood."""
import functools

import jax
import jax.numpy as jnp
import optax

from ddjax import gaussian_diffusion, samplers, schedules
from ddjax.methods.base import (Method, TrainState, count_params, cross_device_mean, ema_update, example_keys,
                               optimizer_step)
from ddjax.models import create_model
from ddjax.validation import check, check_choice, check_types

# {what the message says is allowed: (Python types, keys)} of this method's keys (validation.check_types).
TYPES = {
    'an int': ((int,), 'diffusion.num_timesteps model.ch train.warmup_steps'),
    'a float': ((int, float), 'diffusion.hybrid_lambda train.learning_rate train.weight_decay train.grad_clip '
                'train.p_uncond sample.eta sample.guidance'),
    'a string': ((str,), 'diffusion.schedule diffusion.prediction diffusion.variance diffusion.loss '
                 'sample.sampler sample.spacing'),
    'True or False': ((bool,), 'sample.clip_x0'),
    'None or an int': ((int, type(None)), 'sample.num_steps sample.step_size'),
    'None or a float': ((int, float, type(None)), 'sample.ddim_scale'),
}


# ----------------------------------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------------------------------

def validate(config, device_count: int):
  """The diffusion, model, optimizer and sampler keys (the generic ones are config.validate's); any device
  count."""
  del device_count
  check_types(config, TYPES)
  diff, train, sample, data = config.diffusion, config.train, config.sample, config.data
  check_choice('model.name', config.model.name, ('unet', 'adm'))
  check_choice('diffusion.schedule', diff.schedule, ('linear', 'cosine'))  # vp/geometric are DDGAN's
  check_choice('diffusion.prediction', diff.prediction, gaussian_diffusion.PREDICTIONS)
  check_choice('diffusion.variance', diff.variance, gaussian_diffusion.VARIANCES)
  check_choice('diffusion.loss', diff.loss, gaussian_diffusion.LOSSES)
  check(not (diff.loss == 'simple' and diff.variance == 'learned_range'), 'diffusion.loss', diff.loss,
        "'hybrid' or 'vlb' with diffusion.variance='learned_range' (the simple loss cannot train the variance)")
  check(not (diff.loss == 'hybrid' and diff.variance != 'learned_range'), 'diffusion.loss', diff.loss,
        f"'simple' or 'vlb' with diffusion.variance={diff.variance!r} (the hybrid's vb term stops the mean's "
        'gradient, so with a fixed variance it trains nothing)')
  check(diff.num_timesteps >= (21 if diff.schedule == 'linear' else 1), 'diffusion.num_timesteps',
        diff.num_timesteps, ">= 21 for 'linear', >= 1 for 'cosine'")
  check(diff.hybrid_lambda >= 0, 'diffusion.hybrid_lambda', diff.hybrid_lambda, '>= 0')

  check(train.learning_rate > 0, 'train.learning_rate', train.learning_rate, '> 0')
  check(train.warmup_steps >= 0, 'train.warmup_steps', train.warmup_steps, '>= 0')
  check(train.weight_decay >= 0, 'train.weight_decay', train.weight_decay, '>= 0')
  check(train.grad_clip >= 0, 'train.grad_clip', train.grad_clip, '>= 0 (0 = off)')
  check(0 <= train.p_uncond < 1, 'train.p_uncond', train.p_uncond, 'in [0, 1)')

  check_choice('sample.sampler', sample.sampler, samplers.SAMPLERS)
  check_choice('sample.spacing', sample.spacing, schedules.SPACINGS)
  T = diff.num_timesteps
  check(sample.num_steps is None or 1 <= sample.num_steps <= T, 'sample.num_steps', sample.num_steps,
        f'None or 1..{T} (diffusion.num_timesteps)')
  check(sample.step_size is None or 1 <= sample.step_size <= T, 'sample.step_size', sample.step_size,
        f'None or 1..{T} (diffusion.num_timesteps)')
  check(sample.eta >= 0, 'sample.eta', sample.eta, '>= 0')
  check(sample.ddim_scale is None or sample.ddim_scale >= 0, 'sample.ddim_scale', sample.ddim_scale,
        'None or >= 0')
  check(sample.ddim_scale is None or sample.sampler == 'ddim', 'sample.ddim_scale', sample.ddim_scale,
        "None unless sample.sampler='ddim'")
  check(sample.guidance >= 0, 'sample.guidance', sample.guidance, '>= 0')
  check(sample.guidance == 0 or data.num_classes > 0, 'sample.guidance', sample.guidance,
        '0 for an unconditional model (data.num_classes=0)')
  check(sample.guidance == 0 or train.p_uncond > 0, 'sample.guidance', sample.guidance,
        '0 unless train.p_uncond > 0 (the null class must be trained for classifier-free guidance)')


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


def init_state_fn(config, model, tx):
  """() -> the initial TrainState (pure; Method.initial_state compiles and runs it)."""
  def init_state():
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    params = init_params(config, model, init_rng)
    return TrainState(step=jnp.int32(0), params=params, ema_params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(train_rng))
  return init_state


# ----------------------------------------------------------------------------------------------------------------
# The train step (pure; one device's shard of the batch; collectives over `axis_name`)
# ----------------------------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch, *, model, tx, schedule, prediction, variance, loss, hybrid_lambda,
               num_classes, p_uncond, ema_decay, grad_accum_steps=1, axis_name=None):
  """One AdamW update on the diffusion loss; returns (new state, metrics averaged over all devices).

  Randomness: per-example keys (base.example_keys), so t, ε and label dropout do not depend on how the global
  batch is split over devices or micro-batches; dropout masks use a key per device and micro-batch. With
  grad_accum_steps k the device's batch is processed as k micro-batches whose gradients are averaged: the same
  update as one batch, at 1/k of the activation memory.
  """
  images, labels = batch['image'], batch['label']
  local_batch = images.shape[0]
  keys, dropout_key = example_keys(state, local_batch, axis_name)
  t_keys, eps_keys, drop_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0)
  num_steps = schedule.num_steps
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_steps))(t_keys)
  eps = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(eps_keys)
  if num_classes:  # classifier-free guidance: train the null class on a p_uncond fraction
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, p_uncond))(drop_keys)
    labels = jnp.where(drop, num_classes, labels)
  examples = {'x0': images, 'x_t': gaussian_diffusion.q_sample(schedule, x0=images, t=t, eps=eps), 't': t, 'eps': eps,
              'labels': labels if num_classes else None}

  def loss_fn(params, micro, micro_index):
    output = model.apply({'params': params}, micro['x_t'], micro['t'], micro['labels'], train=True,
                         rngs={'dropout': jax.random.fold_in(dropout_key, micro_index)})
    terms = gaussian_diffusion.training_losses(schedule, output.astype(jnp.float32), x0=micro['x0'], x_t=micro['x_t'],
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
  mean = cross_device_mean(axis_name)
  grads = mean(grads)
  params, opt_state = optimizer_step(tx, grads, state.opt_state, state.params)
  ema_params = ema_update(state.ema_params, params, step=state.step, ema_decay=ema_decay)

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


# ----------------------------------------------------------------------------------------------------------------
# Sampling and likelihood
# ----------------------------------------------------------------------------------------------------------------

def make_sample_fn(config, model, betas):
  """(params, keys [B], labels [B], **values) -> samples, honouring every `config.sample` key (an unconditional
  model ignores `labels`). `values` (any of eta, guidance, ddim_scale) replace the config's; passed as arguments
  of the enclosing jit they are traced, so one compiled program serves every value (`--mode sweep`)."""
  sample_config, diffusion_config = config.sample, config.diffusion
  num_classes = config.data.num_classes or None
  shape_hw = (config.data.image_size, config.data.image_size, config.data.num_channels)
  # sample.step_size, when set, is used instead of sample.num_steps (a config default can't be unset from flags).
  num_steps = None if sample_config.step_size is not None else sample_config.num_steps

  def model_fn(params, x_t, t, y):  # built once: the compiled sampling loop is keyed on it
    return model.apply({'params': params}, x_t, t, y, train=False)

  def sample_fn(params, keys, labels, **values):
    settings = {'eta': sample_config.eta, 'ddim_scale': sample_config.ddim_scale,
                'guidance': sample_config.guidance, **values}
    return samplers.sample(
        model_fn, betas, shape=(labels.shape[0],) + shape_hw, rng=keys, params=params,
        sampler=sample_config.sampler, num_steps=num_steps, step_size=sample_config.step_size,
        spacing=sample_config.spacing, **settings,
        labels=labels if num_classes else None, num_classes=num_classes, prediction=diffusion_config.prediction,
        variance=diffusion_config.variance, clip_x0=sample_config.clip_x0)

  return sample_fn


def sampling_timesteps(config):
  """The respaced timesteps the sampler visits (sample.step_size, when set, wins over sample.num_steps)."""
  sample = config.sample
  num_steps = None if sample.step_size is not None else sample.num_steps
  return schedules.spaced_timesteps(config.diffusion.num_timesteps, num_steps=num_steps, step_size=sample.step_size,
                                    spacing=sample.spacing)


def network_at_random_steps(config, model, params, x_t, labels, rng):
  """One network evaluation of the sampler on x_t at random timesteps: with classifier-free guidance the batched
  conditional + null forward at 2B that each guided step makes (benchmarks time this against the sampler)."""
  t = jax.random.randint(rng, (x_t.shape[0],), 0, config.diffusion.num_timesteps)
  model_fn = lambda x, t, y: model.apply({'params': params}, x, t, y, train=False)
  if config.data.num_classes and config.sample.guidance > 0:  # as samplers.sample guides
    model_fn = samplers.classifier_free_guidance(model_fn, guidance=config.sample.guidance,
                                                 num_classes=config.data.num_classes,
                                                 mean_channels=config.data.num_channels)
  return model_fn(x_t, t, labels)


def describe_sampler(config) -> str:
  sample = config.sample
  steps = (f'step size {sample.step_size}' if sample.step_size is not None
           else f'{sample.num_steps} steps ({sample.spacing})' if sample.num_steps
           else f'{config.diffusion.num_timesteps} steps')
  return f'{sample.sampler}, {steps}' + (f', guidance {sample.guidance}' if sample.guidance else '')


def make_nll_fn(config, model, schedule):
  """(params, x0, labels, rng) -> the −log p(x0) bound in bits/dim per example (gaussian_diffusion.bits_per_dim, every
  timestep); class-conditional models are conditioned on the true class."""
  num_classes = config.data.num_classes

  def nll_fn(params, x0, labels, rng):
    def model_fn(x_t, t, y):
      return model.apply({'params': params}, x_t, t, y, train=False)
    return gaussian_diffusion.bits_per_dim(model_fn, schedule, x0=x0, rng=rng, labels=labels if num_classes else None,
                                  prediction=config.diffusion.prediction, variance=config.diffusion.variance,
                                  clip_x0=config.sample.clip_x0)['bpd']

  return nll_fn


def build(config) -> Method:
  model = create_model(config)
  betas = schedules.get_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
  schedule = schedules.make_schedule(betas)
  tx = make_optimizer(config.train)
  learning_rate = learning_rate_schedule(config.train)
  return Method(
      init_state=init_state_fn(config, model, tx),
      train_step=bind_train_step(config, model, tx, schedule),
      sample_fn=make_sample_fn(config, model, betas),
      watched_metrics=('loss', 'grad_norm', 'param_norm'),
      console_metrics=('loss',),
      learning_rates=lambda n: {'learning_rate': float(learning_rate(n))},
      sampler=describe_sampler(config),
      parameter_counts=lambda params: {config.model.name: count_params(params)},
      network_fn=functools.partial(network_at_random_steps, config, model),
      network_evals=len(sampling_timesteps(config)),
      nll_fn=make_nll_fn(config, model, schedule))
