"""Diffusion math as pure functions over a `Schedule`: forward process, posterior, parametrisations, losses, NLL.

Notation as the papers: x0 (data), x_t (noised), eps (noise), v = √ᾱ·eps − √(1−ᾱ)·x0, ᾱ = alphas_cumprod.
`t` is always the step index into the schedule (an int32 vector, one entry per example). Images are NHWC.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddjax.schedules import Schedule
from ddjax.validation import check, check_choice

PREDICTIONS = ('eps', 'x0', 'v')
VARIANCES = ('fixed_small', 'fixed_large', 'learned_range')
LOSSES = ('simple', 'hybrid', 'vlb')


def validate(*, prediction: str, variance: str, loss: str | None = None):
  """Check the parametrisation names (one-line ConfigError naming the argument)."""
  check_choice('prediction', prediction, PREDICTIONS)
  check_choice('variance', variance, VARIANCES)
  if loss is not None:
    check_choice('loss', loss, LOSSES)
    check(not (loss == 'simple' and variance == 'learned_range'), 'loss', loss,
          "'hybrid' or 'vlb' with variance 'learned_range' (the simple loss gives its variance no gradient)")


def output_channels(num_channels: int, variance: str) -> int:
  """C network output channels, or 2C when the network also predicts the learned-range variance."""
  return 2 * num_channels if variance == 'learned_range' else num_channels


def at(array: jnp.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """array[t] broadcast against a batch `x` shaped [B, ...]."""
  return array[t].reshape((-1,) + (1,) * (x.ndim - 1))


# ----------------------------------------------------------------------------------------------------------------
# Forward process, posterior and parametrisations
# ----------------------------------------------------------------------------------------------------------------

def q_sample(schedule: Schedule, *, x0, t, eps):
  """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·eps."""
  return at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * eps


def q_posterior(schedule: Schedule, *, x0, x_t, t):
  """q(x_{t−1} | x_t, x0) = N(μ̃, β̃): returns (μ̃ = c1·x0 + c2·x_t, β̃_t, clipped log β̃_t)."""
  mean = at(schedule.posterior_mean_coef1, t, x_t) * x0 + at(schedule.posterior_mean_coef2, t, x_t) * x_t
  return (mean, at(schedule.posterior_variance, t, x_t), at(schedule.posterior_log_variance_clipped, t, x_t))


def x0_from_eps(schedule: Schedule, *, x_t, t, eps):
  """x0 = x_t/√ᾱ − √(1/ᾱ − 1)·eps."""
  return at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def eps_from_x0(schedule: Schedule, *, x_t, t, x0):
  """eps = (x_t/√ᾱ − x0) / √(1/ᾱ − 1)."""
  return (at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t)


def v_from_x0_eps(schedule: Schedule, *, x0, t, eps):
  """v = √ᾱ·eps − √(1−ᾱ)·x0."""
  return at(schedule.sqrt_alphas_cumprod, t, x0) * eps - at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def x0_from_v(schedule: Schedule, *, x_t, t, v):
  """x0 = √ᾱ·x_t − √(1−ᾱ)·v."""
  return at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def eps_from_v(schedule: Schedule, *, x_t, t, v):
  """eps = √(1−ᾱ)·x_t + √ᾱ·v."""
  return at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + at(schedule.sqrt_alphas_cumprod, t, x_t) * v


# ----------------------------------------------------------------------------------------------------------------
# The prediction adapter: any network output -> x0, eps, and the reverse-step Gaussian
# ----------------------------------------------------------------------------------------------------------------

class Prediction(NamedTuple):
  x0: jnp.ndarray            # x̂0 (clipped to [−1, 1] when asked)
  eps: jnp.ndarray           # ε̂ consistent with x̂0 and x_t
  mean: jnp.ndarray          # μ_θ = μ̃(x̂0, x_t)
  log_variance: jnp.ndarray  # log Σ_θ of p(x_{t−1} | x_t)


def split_output(model_output, variance: str):
  """(mean part [.., C], variance part [.., C] or None) of a network output with C or 2C channels."""
  if variance == 'learned_range':
    return jnp.split(model_output, 2, axis=-1)
  return model_output, None


def reverse_log_variance(schedule: Schedule, *, variance: str, variance_output, t, x_t):
  """log Σ_θ: fixed_small log β̃, fixed_large log β (β̃_1 at t=0), or learned_range
  ((v+1)/2)·log β + (1 − (v+1)/2)·log β̃ for the network's v ∈ [−1, 1]."""
  if variance == 'fixed_small':
    return jnp.broadcast_to(at(schedule.posterior_log_variance_clipped, t, x_t), x_t.shape)
  if variance == 'fixed_large':
    return jnp.broadcast_to(at(schedule.fixed_large_log_variance, t, x_t), x_t.shape)
  frac = (variance_output + 1.0) / 2.0
  return frac * at(schedule.log_betas, t, x_t) + (1.0 - frac) * at(schedule.posterior_log_variance_clipped, t, x_t)


def predict(schedule: Schedule, model_output, *, x_t, t, prediction: str, variance: str,
            clip_x0: bool = False) -> Prediction:
  """Turn a raw network output (eps / x0 / v, plus variance channels for learned_range) into a `Prediction`."""
  out, variance_output = split_output(model_output, variance)
  if prediction == 'eps':
    x0, eps = x0_from_eps(schedule, x_t=x_t, t=t, eps=out), out
  elif prediction == 'x0':
    x0, eps = out, eps_from_x0(schedule, x_t=x_t, t=t, x0=out)
  else:
    x0, eps = x0_from_v(schedule, x_t=x_t, t=t, v=out), eps_from_v(schedule, x_t=x_t, t=t, v=out)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = eps_from_x0(schedule, x_t=x_t, t=t, x0=x0)
  mean, _, _ = q_posterior(schedule, x0=x0, x_t=x_t, t=t)
  log_variance = reverse_log_variance(schedule, variance=variance, variance_output=variance_output, t=t, x_t=x_t)
  return Prediction(x0=x0, eps=eps, mean=mean, log_variance=log_variance)


def target(schedule: Schedule, *, prediction: str, x0, x_t, t, eps):
  """The regression target of the simple loss for the chosen parametrisation."""
  if prediction == 'eps':
    return eps
  if prediction == 'x0':
    return x0
  return v_from_x0_eps(schedule, x0=x0, t=t, eps=eps)


# ----------------------------------------------------------------------------------------------------------------
# Likelihood pieces
# ----------------------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(μ1, e^{lv1}) ‖ N(μ2, e^{lv2})) = ½(−1 + lv2 − lv1 + e^{lv1−lv2} + (μ1−μ2)² e^{−lv2}), elementwise, nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715x³))) (the approximation IDDPM uses)."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log P(bin of x) for 8-bit data in [−1, 1] (bin width 2/255) under N(means, e^{2·log_scales});
  the edge bins extend to ±∞. Elementwise, nats."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_over_pixels(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(schedule: Schedule, pred: Prediction, *, x0, x_t, t):
  """L_t in bits/dim per example: KL(q(x_{t−1}|x_t,x0) ‖ p_θ) for t > 0, decoder −log p_θ(x0|x_1) at t = 0."""
  true_mean, _, true_log_variance = q_posterior(schedule, x0=x0, x_t=x_t, t=t)
  kl = mean_over_pixels(normal_kl(true_mean, true_log_variance, pred.mean, pred.log_variance)) / np.log(2.0)
  decoder_nll = -mean_over_pixels(discretized_gaussian_log_likelihood(
      x0, means=pred.mean, log_scales=0.5 * pred.log_variance)) / np.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(schedule: Schedule, x0):
  """KL(q(x_T | x0) ‖ N(0, I)) in bits/dim per example (not learned; ~0 for a good schedule)."""
  t = jnp.full((x0.shape[0],), schedule.num_steps - 1, jnp.int32)
  mean = at(schedule.sqrt_alphas_cumprod, t, x0) * x0
  log_variance = jnp.log(at(1.0 - schedule.alphas_cumprod, t, x0))
  return mean_over_pixels(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# Training losses
# ----------------------------------------------------------------------------------------------------------------

def training_losses(schedule: Schedule, model_output, *, x0, x_t, t, eps, prediction: str, variance: str,
                    loss: str, hybrid_lambda: float = 0.001):
  """Per-example losses for one uniformly drawn t: {'loss', 'mse', 'vb'} (vb in bits/dim).

  simple: mse on the parametrisation's target. vlb: T·L_t (an unbiased estimate of the bound, IDDPM's
  RESCALED_KL). hybrid: mse + λ·T·L_t, where L_t sees the mean through stop_gradient so only the variance
  channels learn from it (IDDPM; λ = 0.001 makes λ·T = T/1000, IDDPM's RESCALED_MSE).
  """
  out, variance_output = split_output(model_output, variance)
  mse = mean_over_pixels((target(schedule, prediction=prediction, x0=x0, x_t=x_t, t=t, eps=eps) - out) ** 2)
  if loss == 'simple':
    return {'loss': mse, 'mse': mse}
  if loss == 'hybrid':
    frozen = jax.lax.stop_gradient(out)
    model_output = frozen if variance_output is None else jnp.concatenate([frozen, variance_output], axis=-1)
  pred = predict(schedule, model_output, x_t=x_t, t=t, prediction=prediction, variance=variance)
  vb = vb_terms_bpd(schedule, pred, x0=x0, x_t=x_t, t=t)
  scale = schedule.num_steps * (hybrid_lambda if loss == 'hybrid' else 1.0)
  total = mse + scale * vb if loss == 'hybrid' else scale * vb
  return {'loss': total, 'mse': mse, 'vb': vb}


# ----------------------------------------------------------------------------------------------------------------
# NLL: the full variational bound (IDDPM's calc_bpd_loop), one lax.scan over every timestep
# ----------------------------------------------------------------------------------------------------------------

def bits_per_dim(model_fn, schedule: Schedule, *, x0, rng, labels=None, prediction: str, variance: str,
                 clip_x0: bool = False):
  """−log p(x0) bound in bits/dim per example: prior + Σ_t L_t (decoder at t = 0).

  Returns {'bpd' [B], 'prior_bpd' [B], 'vb' [B, T]}. `model_fn(x_t, timesteps, labels)` sees original timesteps.
  """
  batch = x0.shape[0]
  keys = jax.random.split(rng, batch)

  def step(_, i):
    t = jnp.full((batch,), i, jnp.int32)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x0.shape[1:]))(keys)
    x_t = q_sample(schedule, x0=x0, t=t, eps=eps)
    output = model_fn(x_t, schedule.timesteps[t], labels)
    pred = predict(schedule, output, x_t=x_t, t=t, prediction=prediction, variance=variance, clip_x0=clip_x0)
    return None, vb_terms_bpd(schedule, pred, x0=x0, x_t=x_t, t=t)

  _, vb = jax.lax.scan(step, None, jnp.arange(schedule.num_steps))
  vb = vb.T
  prior = prior_bpd(schedule, x0)
  return {'bpd': prior + vb.sum(axis=1), 'prior_bpd': prior, 'vb': vb}
