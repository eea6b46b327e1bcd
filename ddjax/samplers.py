"""Compiled samplers: DDPM ancestral, DDIM (η), the seed's ddim_scale, DPM-Solver++(2M), classifier-free guidance,
DDGAN.

Each sampler is one `lax.scan` over a precomputed (possibly respaced) time grid inside `jit`, so a 1000-step
loop compiles like a 10-step one. Noise is drawn per example from that example's own key folded with the step
index, so a sample does not depend on the batch it was drawn in. Every sampler consumes the same `Prediction`
(x̂0, ε̂, μ_θ, log Σ_θ) from `gaussian_diffusion.predict`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddjax import gaussian_diffusion
from ddjax.schedules import DEFAULT_SPACING, Schedule, make_schedule, respace_betas, spaced_timesteps
from ddjax.validation import check, check_choice

SAMPLERS = ('ddpm', 'ddim', 'dpm++2m')


def draw_labels(rng, num: int, *, num_classes: int, class_label: int = -1):
  """`num` class labels: `class_label` repeated, or uniform over the real classes 0..num_classes−1 when −1
  (never the null class num_classes)."""
  check(num_classes >= 1, 'num_classes', num_classes, '>= 1 to draw class labels')
  check(-1 <= class_label < num_classes, 'class_label', class_label, f'-1 (random) or 0..{num_classes - 1}')
  if class_label == -1:
    return jax.random.randint(rng, (num,), 0, num_classes, dtype=jnp.int32)
  return jnp.full((num,), class_label, jnp.int32)


def classifier_free_guidance(model_fn, *, guidance, num_classes: int, mean_channels: int):
  """model_fn with ε̃ = (1+w)·ε(x,c) − w·ε(x,∅): conditional and null class (index num_classes) in one batched
  forward pass. Only the first `mean_channels` output channels (ε / x0 / v; the same guidance for all three, as
  ε is affine in them at fixed x_t) are combined; learned-variance channels after them are the conditional
  ones, as GLIDE and guided-diffusion do (guiding them would push v outside [−1, 1] and extrapolate log Σ beyond
  [log β̃, log β])."""
  def guided(x_t, t, labels):
    null = jnp.full_like(labels, num_classes)
    both = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
    cond, uncond = jnp.split(both, 2)
    mean = (1.0 + guidance) * cond[..., :mean_channels] - guidance * uncond[..., :mean_channels]
    return jnp.concatenate([mean, cond[..., mean_channels:]], axis=-1)
  return guided


def _noise(keys, step, shape):
  """Per-example N(0, I) of `shape` (without batch) from each example's key folded with `step`."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)


def _chain_start(rng, shape):
  """(x_T ~ N(0, I) [shape], step keys [B]): each example's x_T from a key of its own, the noise of step i from its
  step key folded with i. So every sampler and number of steps starts an example from the same x_T, and the cells
  of a sweep differ by the sampler settings alone."""
  keys = jax.vmap(lambda k: jax.random.split(k, 2))(per_example_keys(rng, shape[0]))
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys[:, 0]), keys[:, 1]


def per_example_keys(rng, batch: int):
  """One key per example: `rng` itself when it is already [batch] keys (e.g. keys folded from each sample's
  global index, so a sample does not depend on the batch size or device count), else fold_in(rng, i)."""
  rng = rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
  if rng.shape == (batch,):
    return rng
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))


def dpm_solver_coefficients(alpha_bar: np.ndarray) -> np.ndarray:
  """[N, 3] float64 (a_i, b_i, r_i) of DPM-Solver++(2M) (Lu et al. 2022, alg. 2, the midpoint form) for step i,
  from ᾱ_i to ᾱ_{i−1} (ᾱ_{−1} = 1) on the kept grid `alpha_bar` (ascending):

    α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ),  h_i = λ_{i−1} − λ_i,
    D_i = x̂0_i + r_i·(x̂0_i − x̂0_{i+1}),  r_i = h_i / (2·h_{i+1})   (r_i = 0: first order)
    x_{i−1} = a_i·x_i + b_i·D_i,  a_i = σ_{i−1}/σ_i,  b_i = α_{i−1}·(1 − e^{−h_i}) = α_{i−1} − σ_{i−1}·α_i/σ_i.

  First order at the first step (no previous x̂0) and at the last, whose target σ = 0 makes it return D_0 = x̂0_0
  (diffusers' lower_order_final with final_sigmas_type='zero'). a and b are written without λ so that the last
  step (λ_{−1} = ∞) is finite.
  """
  alpha_bar = np.asarray(alpha_bar, np.float64)
  alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
  alpha, sigma = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
  alpha_prev, sigma_prev = np.sqrt(alpha_bar_prev), np.sqrt(1.0 - alpha_bar_prev)
  x_coef = sigma_prev / sigma
  d_coef = alpha_prev - sigma_prev * alpha / sigma
  second = np.zeros_like(alpha_bar)
  log_snr = np.log(alpha) - np.log(sigma)
  middle = np.arange(1, len(alpha_bar) - 1)  # every step but the first (i = N−1) and the last (i = 0)
  h = log_snr[middle - 1] - log_snr[middle]
  second[middle] = h / (2.0 * (log_snr[middle] - log_snr[middle + 1]))
  return np.stack([x_coef, d_coef, second], axis=1)


def _traced(value) -> bool:
  """A JAX value traced by an enclosing jit: known only when the program runs, so it cannot be checked (or decide
  the program's structure) here."""
  return isinstance(value, jax.core.Tracer)


@functools.partial(jax.jit, static_argnames=('model_fn', 'shape', 'sampler', 'prediction', 'variance', 'clip_x0',
                                             'num_classes', 'use_ddim_scale', 'use_guidance', 'use_noise',
                                             'use_params'))
def _sample_loop(schedule: Schedule, solver, params, rng, labels, x_T, eta, ddim_scale, guidance, *, model_fn, shape,
                 sampler, prediction, variance, clip_x0, num_classes, use_ddim_scale, use_guidance, use_noise,
                 use_params):
  if use_params:
    model_fn = functools.partial(model_fn, params)
  if use_guidance:
    model_fn = classifier_free_guidance(model_fn, guidance=guidance, num_classes=num_classes,
                                        mean_channels=shape[-1])
  x_init, keys = _chain_start(rng, shape)
  x_init = x_init if x_T is None else x_T
  steps = jnp.arange(schedule.num_steps - 1, -1, -1)

  def predict(x_t, i):
    t = jnp.full((shape[0],), i, jnp.int32)
    output = model_fn(x_t, schedule.timesteps[t], labels).astype(jnp.float32)
    return gaussian_diffusion.predict(schedule, output, x_t=x_t, t=t, prediction=prediction, variance=variance,
                                      clip_x0=clip_x0)

  if sampler == 'dpm++2m':
    def solver_step(carry, i):
      x_t, previous_x0 = carry
      x0 = predict(x_t, i).x0
      x_coef, d_coef, second = solver[i, 0], solver[i, 1], solver[i, 2]
      return (x_coef * x_t + d_coef * (x0 + second * (x0 - previous_x0)), x0), None

    (x0, _), _ = jax.lax.scan(solver_step, (x_init, jnp.zeros_like(x_init)), steps)
    return x0

  def step(x_t, i):
    pred = predict(x_t, i)
    not_last = (i > 0).astype(jnp.float32)
    if sampler == 'ddpm':
      return pred.mean + not_last * jnp.exp(0.5 * pred.log_variance) * _noise(keys, i, shape[1:]), None
    alpha_bar_prev = schedule.alphas_cumprod_prev[i]
    posterior_variance = schedule.posterior_variance[i]
    if use_ddim_scale:
      # The seed: s·β̃ leaves the deterministic direction, s·Σ (learned variance if any) is added as noise.
      model_variance = jnp.exp(pred.log_variance) if variance == 'learned_range' else posterior_variance
      direction_variance = jnp.maximum(1.0 - alpha_bar_prev - ddim_scale * posterior_variance, 0.0)
      noise_variance = ddim_scale * model_variance
    else:
      # DDIM: σ² = η²·β̃ on the strided schedule.
      noise_variance = eta**2 * posterior_variance
      direction_variance = jnp.maximum(1.0 - alpha_bar_prev - noise_variance, 0.0)
    x_prev = jnp.sqrt(alpha_bar_prev) * pred.x0 + jnp.sqrt(direction_variance) * pred.eps
    if use_noise:
      x_prev = x_prev + not_last * jnp.sqrt(noise_variance) * _noise(keys, i, shape[1:])
    return x_prev, None

  x0, _ = jax.lax.scan(step, x_init, steps)
  return x0


def sample(model_fn, betas, *, shape, rng, sampler='ddim', num_steps=None, step_size=None, eta=0.0,
           ddim_scale=None, guidance=0.0, labels=None, num_classes=None, prediction='eps',
           variance='fixed_small', clip_x0=False, params=None, spacing=DEFAULT_SPACING, x_T=None):
  """Draw samples [B, H, W, C] float32 in model space (not clamped).

  model_fn(x_t, t, labels) -> network output (C channels, 2C for learned_range), t the int32 ORIGINAL timestep
  per example; with `params` given, model_fn(params, x_t, t, labels), so the weights are an argument of the
  compiled loop and not constants baked into it (one compilation per shape for any weights). `betas` is the
  training β table (float64). The loop runs on the respaced schedule of `num_steps` on the `spacing` grid
  (schedules.spaced_timesteps: 'even', 'leading', 'trailing'), or of the seed's `step_size` (all steps when
  neither is set): sampler 'ddpm' is ancestral sampling with the model's variance; 'ddim' is DDIM with
  σ = η·√β̃, or the seed's x_{t−1} = √ᾱ_prev·x̂0 + √max(1−ᾱ_prev−s·β̃, 0)·ε̂ + √(s·Σ)·z when `ddim_scale` s is given;
  'dpm++2m' is DPM-Solver++(2M) on the data prediction x̂0 (`dpm_solver_coefficients`; deterministic, one network
  evaluation per step; learned-variance models use their mean prediction only). guidance w > 0 is classifier-free
  guidance (needs labels and num_classes); it combines the mean channels only and keeps the conditional variance. `rng` is one key,
  or [B] keys, one per example; `x_T` [B, H, W, C], when given, is the chain's start instead of a draw from them.
  model_fn must be hashable and stable across calls for the compiled loop to be
  reused (a module-level function, or one built once). `eta`, `guidance` and `ddim_scale` may be JAX scalars
  traced by an enclosing jit (`--mode sweep` passes them as arguments, so one compiled program serves every value);
  their values are then the caller's to check, and a traced guidance always builds the guided program.
  """
  check_choice('sampler', sampler, SAMPLERS)
  gaussian_diffusion.validate(prediction=prediction, variance=variance)
  check(len(shape) == 4, 'shape', shape, '(batch, height, width, channels)')
  check(_traced(eta) or eta >= 0, 'eta', eta, '>= 0')
  check(ddim_scale is None or _traced(ddim_scale) or ddim_scale >= 0, 'ddim_scale', ddim_scale, 'None or >= 0')
  check(ddim_scale is None or sampler == 'ddim', 'ddim_scale', ddim_scale, "None unless sampler='ddim'")
  check(_traced(guidance) or guidance >= 0, 'guidance', guidance, '>= 0')
  use_guidance = _traced(guidance) or guidance > 0
  check(not use_guidance or (labels is not None and num_classes), 'guidance', guidance,
        '0 unless labels and num_classes are given (classifier-free guidance needs a class-conditional model)')
  check(labels is None or np.shape(labels) == (shape[0],), 'labels', f'shape {np.shape(labels)}',
        f'None or shape ({shape[0]},)')
  check(x_T is None or np.shape(x_T) == tuple(shape), 'x_T', f'shape {np.shape(x_T)}', f'None or shape {tuple(shape)}')
  # Deterministic DDIM (η = 0, or ddim_scale 0) draws no z: a threefry draw is most of a step's work outside the
  # network. A traced η / ddim_scale may be nonzero.
  noise_scale = eta if ddim_scale is None else ddim_scale
  use_noise = sampler == 'ddpm' or (sampler == 'ddim' and (_traced(noise_scale) or noise_scale > 0))
  betas = np.asarray(betas, np.float64)
  timesteps = spaced_timesteps(len(betas), num_steps=num_steps, step_size=step_size, spacing=spacing)
  schedule = make_schedule(respace_betas(betas, timesteps), timesteps)
  solver = None
  if sampler == 'dpm++2m':
    solver = jnp.asarray(dpm_solver_coefficients(np.cumprod(1.0 - betas)[timesteps]), jnp.float32)
  return _sample_loop(
      schedule, solver, params, rng, labels, None if x_T is None else jnp.asarray(x_T, jnp.float32),
      jnp.float32(eta), jnp.float32(0.0 if ddim_scale is None else ddim_scale), jnp.float32(guidance),
      model_fn=model_fn, shape=tuple(shape), sampler=sampler, prediction=prediction, variance=variance,
      clip_x0=bool(clip_x0), num_classes=num_classes, use_ddim_scale=ddim_scale is not None,
      use_guidance=use_guidance, use_noise=use_noise, use_params=params is not None)


@functools.partial(jax.jit, static_argnames=('generator_fn', 'shape', 'nz', 'use_params'))
def _ddgan_loop(schedule: Schedule, params, rng, labels, *, generator_fn, shape, nz, use_params):
  if use_params:
    generator_fn = functools.partial(generator_fn, params)
  x_init, keys = _chain_start(rng, shape)

  def step(x_t, i):
    t = jnp.full((shape[0],), i, jnp.int32)
    z_keys = jax.vmap(lambda k: jax.random.fold_in(k, i + schedule.num_steps))(keys)
    latent = _noise(z_keys, 0, (nz,))
    x0 = generator_fn(x_t, t, latent, labels).astype(jnp.float32)
    mean, _, log_variance = gaussian_diffusion.q_posterior(schedule, x0=x0, x_t=x_t, t=t)
    not_last = (i > 0).astype(jnp.float32)
    return mean + not_last * jnp.exp(0.5 * log_variance) * _noise(keys, i, shape[1:]), None

  x0, _ = jax.lax.scan(step, x_init, jnp.arange(schedule.num_steps - 1, -1, -1))
  return x0


def sample_ddgan(generator_fn, betas, *, shape, rng, nz, labels=None, params=None):
  """DDGAN sampling: x_T ~ N(0, I); for t = T−1..0: x̂0 = G(x_t, t, z), z ~ N(0, I_nz), x_{t−1} ~ q(x_{t−1}|x_t, x̂0).

  generator_fn(x_t, t, z, labels) -> x̂0, or generator_fn(params, x_t, t, z, labels) when `params` is given (the
  weights an argument of the compiled loop, as in `sample`); `betas` the T (1–8) transition betas, e.g.
  get_betas('vp', T); `rng` one key or [B] keys, one per example. Exactly T generator calls.
  """
  check(1 <= len(betas) <= 8, 'num_timesteps', len(betas), 'a DDGAN chain of 1..8 steps')
  check(len(shape) == 4, 'shape', shape, '(batch, height, width, channels)')
  check(nz >= 1, 'nz', nz, '>= 1')
  return _ddgan_loop(make_schedule(betas), params, rng, labels, generator_fn=generator_fn, shape=tuple(shape),
                     nz=nz, use_params=params is not None)
