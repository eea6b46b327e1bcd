"""Denoising Diffusion GANs (Xiao et al. 2022) as a training method: a conditional GAN generator G(x_{t+1}, t, z)
-> x̂0 replaces the Gaussian reverse step, so T = 2..4 denoising steps suffice.

Indexing as DDGAN's code: a data pair at step t ∈ 0..T−1 is (x_t, x_{t+1}), x_t drawn with the cumulative
coefficients whose first β is 1e-8 (so x_0 ≈ the data) and x_{t+1} one more forward step; the network sees
(x_{t+1}, t). On our schedule of the T transition betas β_0..β_{T−1} (schedules.get_betas('vp'|'geometric')) that
is ᾱ'_t = (1 − 10⁻⁸)·ᾱ_{t−1} for x_t (ᾱ_{−1} = 1) and β_t for the step to x_{t+1}; the posterior
q(x_t | x_{t+1}, x̂0) is gaussian_diffusion.q_posterior at index t.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddjax import gaussian_diffusion, samplers, schedules
from ddjax.methods.base import (Method, TrainState, count_params, cross_device_mean, ema_update, example_keys,
                               optimizer_step)
from ddjax.models import create_discriminator, create_model, discriminator
from ddjax.validation import check, check_choice, check_types

FIRST_BETA = 1e-8  # DDGAN prepends this β to its cumulative coefficients: x_0 is the data, barely perturbed
MAX_TIMESTEPS = 8
LR_FLOOR = 1e-5  # DDGAN's cosine decay ends at eta_min = 1e-5

# {what the message says is allowed: (Python types, keys)} of this method's keys (validation.check_types).
TYPES = {
    'an int': ((int,), 'gan.num_timesteps gan.nz gan.z_emb_dim gan.n_mlp gan.lazy_reg gan.d_ch gan.t_emb_dim '
               'gan.lr_decay_steps '
               'model.ch model.num_res_blocks'),
    'a float': ((int, float), 'gan.beta_min gan.beta_max gan.r1_gamma gan.lr_g gan.lr_d gan.beta1 gan.beta2'),
    'a string': ((str,), 'gan.discriminator'),
    'True or False': ((bool,), 'gan.use_geometric model.not_use_tanh'),
    'a tuple of ints': ((tuple, list), 'model.ch_mult model.attn_resolutions'),
}


# ----------------------------------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------------------------------

def validate(config, device_count: int):
  """The gan and generator keys (the generic ones are config.validate's, the networks' sizes the models'), for
  `device_count` devices."""
  check_types(config, TYPES)
  gan, train = config.gan, config.train
  check_choice('model.name', config.model.name, ('ncsnpp',))
  check(1 <= gan.num_timesteps <= MAX_TIMESTEPS, 'gan.num_timesteps', gan.num_timesteps,
        f'1..{MAX_TIMESTEPS} (a DDGAN chain has a few steps: 2 to 4 in the paper)')
  for key in ('nz', 'z_emb_dim', 'n_mlp', 'd_ch'):
    check(gan[key] >= 1, f'gan.{key}', gan[key], '>= 1')
  check(gan.t_emb_dim >= 4 and gan.t_emb_dim % 2 == 0, 'gan.t_emb_dim', gan.t_emb_dim,
        'an even int >= 4 (the sinusoidal embedding of t is half sines, half cosines)')
  check(gan.lazy_reg >= 1, 'gan.lazy_reg', gan.lazy_reg, '>= 1 (the R1 penalty every lazy_reg steps; 1 = always)')
  check(gan.r1_gamma >= 0, 'gan.r1_gamma', gan.r1_gamma, '>= 0 (0 = no R1 penalty)')
  check(gan.lr_decay_steps >= 0, 'gan.lr_decay_steps', gan.lr_decay_steps, '>= 0 (0 = constant rates)')
  check(0 < gan.beta_min < gan.beta_max, 'gan.beta_min', gan.beta_min, f'in (0, gan.beta_max={gan.beta_max})')
  for key in ('lr_g', 'lr_d'):
    check(gan[key] > 0, f'gan.{key}', gan[key], '> 0')
  for key in ('beta1', 'beta2'):
    check(0 <= gan[key] < 1, f'gan.{key}', gan[key], 'in [0, 1)')
  check(train.grad_accum_steps == 1, 'train.grad_accum_steps', train.grad_accum_steps,
        '1 for DDGAN (the discriminator\'s minibatch statistics need the whole device batch)')
  check(not config.model.remat, 'model.remat', config.model.remat, 'False for the NCSN++ generator')
  per_device = config.data.batch_size // device_count
  fits = discriminator.check_batch(per_device)
  check(config.data.batch_size % device_count or fits is None, 'data.batch_size', config.data.batch_size,
        f'{fits} on {device_count} devices')
  betas_of(config)  # a (beta_min, beta_max) whose variances leave (0, 1) fails here


def schedule_name(config) -> str:
  return 'geometric' if config.gan.use_geometric else 'vp'


def betas_of(config) -> np.ndarray:
  gan = config.gan
  return schedules.get_betas(schedule_name(config), gan.num_timesteps, beta_min=gan.beta_min, beta_max=gan.beta_max)


# ----------------------------------------------------------------------------------------------------------------
# The GAN objective (pure functions)
# ----------------------------------------------------------------------------------------------------------------

def q_sample_pair(schedule, *, x0, t, noise, noise_next):
  """(x_t, x_{t+1}): x_t = √ᾱ'_t·x0 + √(1 − ᾱ'_t)·noise with ᾱ'_t = (1 − 10⁻⁸)·ᾱ_{t−1} (ᾱ_{−1} = 1), and
  x_{t+1} = √(1 − β_t)·x_t + √β_t·noise_next (DDGAN's q_sample_pairs). In float32, as in DDGAN's code,
  1 − 10⁻⁸ rounds to 1: x_0 is the data itself."""
  alpha_bar = (1.0 - FIRST_BETA) * gaussian_diffusion.at(schedule.alphas_cumprod_prev, t, x0)
  x_t = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1.0 - alpha_bar) * noise
  beta = gaussian_diffusion.at(schedule.betas, t, x0)
  return x_t, jnp.sqrt(1.0 - beta) * x_t + jnp.sqrt(beta) * noise_next


def posterior_sample(schedule, *, x0, x_next, t, noise):
  """x_t ~ q(x_t | x_{t+1}, x̂0) = N(μ̃_t, β̃_t), noiseless at t = 0 (DDGAN's sample_posterior)."""
  mean, _, log_variance = gaussian_diffusion.q_posterior(schedule, x0=x0, x_t=x_next, t=t)
  not_first = (t > 0).astype(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
  return mean + not_first * jnp.exp(0.5 * log_variance) * noise


def r1_penalty(discriminate, x_t, *, r1_gamma):
  """r1_gamma/2 · mean_b ‖∇_{x_t} Σ_b D(x_t)_b‖² (DDGAN's R1 on real pairs; `discriminate` maps x_t to logits)."""
  grad = jax.grad(lambda x: jnp.sum(discriminate(x)))(x_t)
  return 0.5 * r1_gamma * jnp.mean(jnp.sum(jnp.square(grad).reshape(grad.shape[0], -1), axis=1))


def discriminator_loss(real_logits, fake_logits):
  """Non-saturating: mean softplus(−D(real)) + mean softplus(D(fake))."""
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def generator_loss(fake_logits):
  """Non-saturating: mean softplus(−D(fake))."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


# ----------------------------------------------------------------------------------------------------------------
# State and optimizers
# ----------------------------------------------------------------------------------------------------------------

def learning_rate_schedule(base: float, *, decay_steps: int):
  """Rate of update n: the cosine from `base` to 1e-5 over `decay_steps` updates, then 1e-5 (DDGAN's
  CosineAnnealingLR(eta_min=1e-5), per step instead of per epoch); `base` throughout when decay_steps is 0.
  A key of its own, not train.num_steps, so that a run extended on resume keeps the rates it was trained with."""
  if not decay_steps:
    return lambda count: jnp.asarray(base, jnp.float32)
  floor = min(LR_FLOOR, base)
  return lambda count: floor + (base - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count, decay_steps)
                                                                     / decay_steps))


def make_optimizers(config) -> dict:
  """{'generator': Adam(lr_g), 'discriminator': Adam(lr_d)}, both with (beta1, beta2) = (0.5, 0.9) in the paper."""
  gan = config.gan
  return {name: optax.adam(learning_rate_schedule(rate, decay_steps=gan.lr_decay_steps), b1=gan.beta1,
                           b2=gan.beta2)
          for name, rate in (('generator', gan.lr_g), ('discriminator', gan.lr_d))}


def init_state_fn(config, generator, discriminator, optimizers):
  """() -> the initial TrainState: G and D params, both optimizer states, the EMA of G and the RNG (pure;
  Method.initial_state compiles and runs it)."""
  size, channels, nz = config.data.image_size, config.data.num_channels, config.gan.nz
  labels = jnp.zeros((1,), jnp.int32) if config.data.num_classes else None

  def init_state():
    g_rng, d_rng, train_rng = jax.random.split(jax.random.key(config.seed), 3)
    x, t = jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32)
    params = {'generator': generator.init({'params': g_rng}, x, t, jnp.zeros((1, nz)), labels,
                                          train=False)['params'],
              'discriminator': discriminator.init({'params': d_rng}, x, t, x, labels, train=False)['params']}
    opt_state = {name: optimizers[name].init(params[name]) for name in params}
    return TrainState(step=jnp.int32(0), params=params, ema_params=params['generator'], opt_state=opt_state,
                      rng=jax.random.key_data(train_rng))
  return init_state


# ----------------------------------------------------------------------------------------------------------------
# The train step (pure; one device's shard of the batch; collectives over `axis_name`)
# ----------------------------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch, *, generator, discriminator, optimizers, schedule, nz, r1_gamma,
               lazy_reg, num_classes, ema_decay, axis_name=None):
  """One DDGAN iteration: an Adam step of D on real and fake pairs (+ R1 on the real ones when step % lazy_reg
  is 0, its double backward under a lax.cond so that the other steps skip it), then an Adam step of G against the
  updated D on fresh pairs, then the EMA of G.

  Per-example keys (base.example_keys) draw t, the pair noises, z and the posterior noise, so the numbers do not
  depend on the device count (the discriminator's minibatch-stddev groups consecutive examples, so a per-device
  batch that is a multiple of its group keeps the groups too).
  """
  images = batch['image']
  labels = batch['label'] if num_classes else None
  local_batch = images.shape[0]
  keys, dropout_key = example_keys(state, local_batch, axis_name)
  d_keys, g_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 2))(keys), 1, 0)
  g_params, d_params = state.params['generator'], state.params['discriminator']

  def fake_pair(keys, g_params, dropout):
    """(t, x_t, x_{t+1}, the posterior sample from G's x̂0) for each example's key."""
    t_keys, noise_keys, next_keys, z_keys, posterior_keys = jnp.moveaxis(
        jax.vmap(lambda k: jax.random.split(k, 5))(keys), 1, 0)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_steps))(t_keys)
    normal = lambda ks, shape: jax.vmap(lambda k: jax.random.normal(k, shape))(ks)
    x_t, x_next = q_sample_pair(schedule, x0=images, t=t, noise=normal(noise_keys, images.shape[1:]),
                                noise_next=normal(next_keys, images.shape[1:]))
    x0 = generator.apply({'params': g_params}, x_next, t, normal(z_keys, (nz,)), labels, train=True,
                         rngs={'dropout': dropout}).astype(jnp.float32)
    fake = posterior_sample(schedule, x0=x0, x_next=x_next, t=t, noise=normal(posterior_keys, images.shape[1:]))
    return t, x_t, x_next, fake

  def logits(d_params, x_prev, t, x_next):
    return discriminator.apply({'params': d_params}, x_prev, t, x_next, labels, train=True).astype(jnp.float32)

  mean = cross_device_mean(axis_name)

  # -- D: real pairs, fake pairs (G fixed), R1 on real pairs every lazy_reg steps.
  t, x_t, x_next, fake = fake_pair(d_keys, g_params, jax.random.fold_in(dropout_key, 0))
  fake = jax.lax.stop_gradient(fake)

  def d_loss_fn(d_params):
    real_logits, fake_logits = logits(d_params, x_t, t, x_next), logits(d_params, fake, t, x_next)
    loss = discriminator_loss(real_logits, fake_logits)
    return loss, {'loss_d': loss, 'd_real': jnp.mean(real_logits), 'd_fake': jnp.mean(fake_logits),
                  'd_real_sq': jnp.mean(jnp.square(real_logits))}

  def r1_fn(d_params):
    return r1_penalty(lambda x: logits(d_params, x, t, x_next), x_t, r1_gamma=r1_gamma)

  def no_r1(d_params):
    return jnp.float32(0.0), jax.tree.map(jnp.zeros_like, d_params)

  d_grads, d_terms = jax.grad(d_loss_fn, has_aux=True)(d_params)
  d_terms['r1'], r1_grads = jax.lax.cond(state.step % lazy_reg == 0, jax.value_and_grad(r1_fn), no_r1, d_params)
  d_grads = mean(jax.tree.map(jnp.add, d_grads, r1_grads))
  d_params, d_opt_state = optimizer_step(optimizers['discriminator'], d_grads, state.opt_state['discriminator'],
                                        d_params)

  # -- G: fresh pairs against the updated D.
  def g_loss_fn(g_params):
    t, _, x_next, fake = fake_pair(g_keys, g_params, jax.random.fold_in(dropout_key, 1))
    return generator_loss(logits(d_params, fake, t, x_next))

  loss_g, g_grads = jax.value_and_grad(g_loss_fn)(g_params)
  g_grads = mean(g_grads)
  g_params, g_opt_state = optimizer_step(optimizers['generator'], g_grads, state.opt_state['generator'], g_params)

  metrics = {name: mean(value) for name, value in {**d_terms, 'loss_g': loss_g}.items()}
  # The spread of D's logits over the real pairs of the whole batch: D keeps telling inputs apart while it is
  # away from 0 (docs/ddgan.md).
  metrics['d_real_spread'] = jnp.sqrt(jnp.maximum(metrics.pop('d_real_sq') - jnp.square(metrics['d_real']), 0.0))
  metrics['loss'] = metrics['loss_d'] + metrics['loss_g']
  metrics.update(grad_norm_d=optax.global_norm(d_grads), grad_norm_g=optax.global_norm(g_grads),
                 param_norm_d=optax.global_norm(d_params), param_norm_g=optax.global_norm(g_params))
  new_state = state.replace(
      step=state.step + 1, params={'generator': g_params, 'discriminator': d_params},
      ema_params=ema_update(state.ema_params, g_params, step=state.step, ema_decay=ema_decay),
      opt_state={'generator': g_opt_state, 'discriminator': d_opt_state})
  return new_state, metrics


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------

def generator_at_random_steps(generator, gan, params, x_t, labels, rng):
  """G once on x_t at random steps with random latents (benchmarks time this against the sampler)."""
  t_key, z_key = jax.random.split(rng)
  t = jax.random.randint(t_key, (x_t.shape[0],), 0, gan.num_timesteps)
  z = jax.random.normal(z_key, (x_t.shape[0], gan.nz))
  return generator.apply({'params': params}, x_t, t, z, labels, train=False)


def make_sample_fn(config, generator, betas):
  """(params, keys [B], labels [B]) -> samples: T generator calls (samplers.sample_ddgan)."""
  num_classes = config.data.num_classes
  shape_hw = (config.data.image_size, config.data.image_size, config.data.num_channels)

  def generator_fn(params, x_t, t, z, y):  # built once: the compiled sampling loop is keyed on it
    return generator.apply({'params': params}, x_t, t, z, y, train=False)

  def sample_fn(params, keys, labels):
    return samplers.sample_ddgan(generator_fn, betas, shape=(labels.shape[0],) + shape_hw, rng=keys,
                                 nz=config.gan.nz, labels=labels if num_classes else None, params=params)

  return sample_fn


def build(config) -> Method:
  generator, discriminator = create_model(config), create_discriminator(config)
  betas = betas_of(config)
  optimizers = make_optimizers(config)
  gan = config.gan
  rates = {f'learning_rate_{short}': learning_rate_schedule(rate, decay_steps=gan.lr_decay_steps)
           for short, rate in (('g', gan.lr_g), ('d', gan.lr_d))}
  step = functools.partial(
      train_step, generator=generator, discriminator=discriminator, optimizers=optimizers,
      schedule=schedules.make_schedule(betas), nz=gan.nz, r1_gamma=gan.r1_gamma, lazy_reg=gan.lazy_reg,
      num_classes=config.data.num_classes, ema_decay=config.train.ema_decay)
  return Method(
      init_state=init_state_fn(config, generator, discriminator, optimizers),
      train_step=step,
      sample_fn=make_sample_fn(config, generator, betas),
      watched_metrics=('loss_d', 'loss_g', 'grad_norm_d', 'grad_norm_g', 'param_norm_d', 'param_norm_g'),
      console_metrics=('loss_d', 'loss_g', 'd_real_spread'),
      learning_rates=lambda n: {name: float(rate(n)) for name, rate in rates.items()},
      sampler=f'DDGAN, {gan.num_timesteps} generator steps',
      parameter_counts=lambda params: {name: count_params(tree) for name, tree in params.items()},
      network_fn=functools.partial(generator_at_random_steps, generator, gan),
      network_evals=gan.num_timesteps,
      ema_of='generator')
