"""The diffusion math against closed forms: Bayes posterior, parametrisation round-trips, KL, likelihood, NLL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import gaussian_diffusion, schedules
from ddjax.validation import ConfigError

BETAS = schedules.get_betas('cosine', 1000)
SCHED = schedules.make_schedule(BETAS)


def _batch(seed, shape=(16, 4, 4, 3)):
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  eps = jnp.asarray(rng.normal(size=shape), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, shape[0]), jnp.int32)
  return x0, eps, t


def test_q_sample_moments():
  x0 = jnp.full((4096, 1, 1, 1), 0.7)
  t = jnp.full((4096,), 300, jnp.int32)
  eps = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = np.asarray(gaussian_diffusion.q_sample(SCHED, x0=x0, t=t, eps=eps))
  alpha_bar = np.cumprod(1 - BETAS)[300]
  assert x_t.mean() == pytest.approx(np.sqrt(alpha_bar) * 0.7, abs=4 * np.sqrt((1 - alpha_bar) / 4096))
  assert x_t.std() == pytest.approx(np.sqrt(1 - alpha_bar), rel=0.05)


def test_posterior_equals_bayes_rule():
  # q(x_{t-1}|x_t,x0) ∝ N(x_{t-1}; √ᾱ_{t-1}·x0, 1−ᾱ_{t-1}) · N(x_t; √α_t·x_{t-1}, β_t), in float64.
  x0, eps, t = _batch(1)
  x_t = gaussian_diffusion.q_sample(SCHED, x0=x0, t=t, eps=eps)
  mean, var, log_var = gaussian_diffusion.q_posterior(SCHED, x0=x0, x_t=x_t, t=t)
  alpha_bar = np.cumprod(1 - BETAS)
  tt = np.asarray(t)[:, None, None, None]
  ab_prev = np.where(tt > 0, alpha_bar[np.maximum(tt - 1, 0)], 1.0)
  beta = BETAS[tt]
  precision = 1 / (1 - ab_prev) + (1 - beta) / beta
  bayes_mean = (np.sqrt(ab_prev) * np.asarray(x0, np.float64) / (1 - ab_prev)
                + np.sqrt(1 - beta) * np.asarray(x_t, np.float64) / beta) / precision
  bayes_var = 1 / precision
  keep = np.asarray(t) > 0  # at t = 0 the posterior is the point mass x0
  np.testing.assert_allclose(np.asarray(mean)[keep], bayes_mean[keep], atol=2e-5)
  np.testing.assert_allclose(np.asarray(var)[keep, 0, 0, 0], bayes_var[keep, 0, 0, 0], rtol=1e-4)
  np.testing.assert_allclose(np.exp(np.asarray(log_var)[keep, 0, 0, 0]), bayes_var[keep, 0, 0, 0], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(mean)[~keep], np.asarray(x0)[~keep], atol=1e-6)


def test_parametrisations_round_trip():
  x0, eps, t = _batch(2)
  t = jnp.clip(t, 10, 990)  # away from ᾱ≈1 and ᾱ≈0, where one direction divides by ~0
  x_t = gaussian_diffusion.q_sample(SCHED, x0=x0, t=t, eps=eps)
  v = gaussian_diffusion.v_from_x0_eps(SCHED, x0=x0, t=t, eps=eps)
  np.testing.assert_allclose(gaussian_diffusion.x0_from_eps(SCHED, x_t=x_t, t=t, eps=eps), x0, atol=2e-4)
  np.testing.assert_allclose(gaussian_diffusion.eps_from_x0(SCHED, x_t=x_t, t=t, x0=x0), eps, atol=2e-4)
  np.testing.assert_allclose(gaussian_diffusion.x0_from_v(SCHED, x_t=x_t, t=t, v=v), x0, atol=1e-5)
  np.testing.assert_allclose(gaussian_diffusion.eps_from_v(SCHED, x_t=x_t, t=t, v=v), eps, atol=1e-5)
  for prediction, output in [('eps', eps), ('x0', x0), ('v', v)]:
    pred = gaussian_diffusion.predict(SCHED, output, x_t=x_t, t=t, prediction=prediction, variance='fixed_small')
    np.testing.assert_allclose(pred.x0, x0, atol=2e-4, err_msg=prediction)
    np.testing.assert_allclose(pred.eps, eps, atol=2e-4, err_msg=prediction)
    posterior_mean, _, _ = gaussian_diffusion.q_posterior(SCHED, x0=x0, x_t=x_t, t=t)
    np.testing.assert_allclose(pred.mean, posterior_mean, atol=2e-4, err_msg=prediction)


def test_variance_parametrisations():
  x0, eps, t = _batch(3, shape=(8, 2, 2, 1))
  x_t = gaussian_diffusion.q_sample(SCHED, x0=x0, t=t, eps=eps)
  small = np.asarray(SCHED.posterior_log_variance_clipped)[np.asarray(t)]
  large = np.asarray(SCHED.log_betas)[np.asarray(t)]
  for v, expected in [(-1.0, small), (1.0, large), (0.0, 0.5 * (small + large))]:
    output = jnp.concatenate([eps, jnp.full_like(eps, v)], axis=-1)
    pred = gaussian_diffusion.predict(SCHED, output, x_t=x_t, t=t, prediction='eps', variance='learned_range')
    np.testing.assert_allclose(np.asarray(pred.log_variance)[:, 0, 0, 0], expected, rtol=1e-5)
  large_pred = gaussian_diffusion.predict(SCHED, eps, x_t=x_t, t=t, prediction='eps', variance='fixed_large')
  expected_large = np.where(np.asarray(t) == 0, np.log(float(SCHED.posterior_variance[1])), large)
  np.testing.assert_allclose(np.asarray(large_pred.log_variance)[:, 0, 0, 0], expected_large, rtol=1e-5)


def test_normal_kl():
  mean = jnp.linspace(-2, 2, 9)
  logvar = jnp.linspace(-3, 1, 9)
  np.testing.assert_allclose(gaussian_diffusion.normal_kl(mean, logvar, mean, logvar), 0.0, atol=1e-7)
  # KL(N(1, 1) ‖ N(0, e²)) = ½(−1 + 2 − 0 + e^{−2} + e^{−2}) in closed form.
  assert float(gaussian_diffusion.normal_kl(1.0, 0.0, 0.0, 2.0)) == pytest.approx(0.5 * (1 + 2 * np.exp(-2)), rel=1e-6)


@pytest.mark.parametrize('mean, log_scale', [(0.0, np.log(0.1)), (0.37, np.log(0.02)), (-0.99, np.log(0.5))])
def test_discretized_gaussian_sums_to_one(mean, log_scale):
  bins = jnp.asarray(np.arange(256) / 127.5 - 1.0, jnp.float32)
  log_probs = gaussian_diffusion.discretized_gaussian_log_likelihood(bins, means=mean, log_scales=log_scale)
  assert float(jnp.exp(log_probs).sum()) == pytest.approx(1.0, abs=1e-3)


def test_hybrid_loss_stops_mean_gradient_in_vb():
  x0, eps, t = _batch(4, shape=(8, 2, 2, 1))
  x_t = gaussian_diffusion.q_sample(SCHED, x0=x0, t=t, eps=eps)

  def vb_part(output, loss):
    terms = gaussian_diffusion.training_losses(SCHED, output, x0=x0, x_t=x_t, t=t, eps=eps, prediction='eps',
                                      variance='learned_range', loss=loss)
    return jnp.sum(terms['loss'] - terms['mse']) if loss == 'hybrid' else jnp.sum(terms['loss'])

  output = jnp.concatenate([eps + 0.1, jnp.zeros_like(eps)], axis=-1)
  grad_hybrid = jax.grad(vb_part)(output, 'hybrid')
  grad_vlb = jax.grad(vb_part)(output, 'vlb')
  assert float(jnp.abs(grad_hybrid[..., :1]).max()) == 0.0  # mean channels: no gradient from λ·L_vlb
  assert float(jnp.abs(grad_hybrid[..., 1:]).max()) > 0.0
  assert float(jnp.abs(grad_vlb[..., :1]).max()) > 0.0  # the pure bound trains the mean too
  terms = gaussian_diffusion.training_losses(SCHED, output, x0=x0, x_t=x_t, t=t, eps=eps, prediction='eps',
                                    variance='learned_range', loss='hybrid')
  np.testing.assert_allclose(terms['loss'], terms['mse'] + 0.001 * 1000 * terms['vb'], rtol=1e-6)
  np.testing.assert_allclose(terms['mse'], 0.01, rtol=1e-5)


@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v'])
def test_simple_loss_zero_at_true_target(prediction):
  x0, eps, t = _batch(5)
  x_t = gaussian_diffusion.q_sample(SCHED, x0=x0, t=t, eps=eps)
  output = gaussian_diffusion.target(SCHED, prediction=prediction, x0=x0, x_t=x_t, t=t, eps=eps)
  terms = gaussian_diffusion.training_losses(SCHED, output, x0=x0, x_t=x_t, t=t, eps=eps, prediction=prediction,
                                    variance='fixed_small', loss='simple')
  np.testing.assert_allclose(terms['loss'], 0.0, atol=1e-12)


def _gaussian_nll(schedule_name, T, variance, x0, mu, s):
  sched = schedules.make_schedule(schedules.get_betas(schedule_name, T))
  alpha_bar = sched.alphas_cumprod

  def exact_eps(x_t, t, labels):  # E[ε | x_t] for x0 ~ N(mu, s²)
    a = alpha_bar[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)

  out = jax.jit(lambda x: gaussian_diffusion.bits_per_dim(exact_eps, sched, x0=x, rng=jax.random.key(1), prediction='eps',
                                                 variance=variance))(x0)
  assert out['vb'].shape == (x0.shape[0], T)
  return float(out['bpd'].mean())


def test_nll_of_exact_model_approaches_entropy():
  mu, s = 0.1, 0.3
  x = np.random.default_rng(0).normal(mu, s, (512, 4, 4, 1))
  x0 = jnp.asarray(np.clip(np.round((x + 1) * 127.5), 0, 255) / 127.5 - 1, jnp.float32)  # 8-bit data
  entropy = 0.5 * np.log2(2 * np.pi * np.e * s * s) + np.log2(255 / 2)  # of the discretised Gaussian, bits/dim
  small = [_gaussian_nll('linear', T, 'fixed_small', x0, mu, s) for T in (100, 1000, 4000)]
  print('entropy', entropy, 'fixed_small bpd at T=100/1000/4000', small)
  assert small[0] > small[1] > small[2] > entropy - 0.01
  assert small[2] - entropy < 0.6
  large = _gaussian_nll('linear', 4000, 'fixed_large', x0, mu, s)
  assert abs(large - entropy) < 0.05


@pytest.mark.parametrize('kwargs, key', [
    (dict(prediction='score', variance='fixed_small'), 'prediction'),
    (dict(prediction='eps', variance='learned'), 'variance'),
    (dict(prediction='eps', variance='fixed_small', loss='l1'), 'loss'),
    (dict(prediction='eps', variance='learned_range', loss='simple'), 'loss'),
])
def test_bad_names(kwargs, key):
  with pytest.raises(ConfigError, match=f'^{key}='):
    gaussian_diffusion.validate(**kwargs)
