"""Schedules against their closed forms (IDDPM, DDGAN) and respacing against IDDPM's SpacedDiffusion."""
import math

import numpy as np
import pytest

from ddjax import schedules
from ddjax.validation import ConfigError


def test_linear_endpoints_and_t_scaling():
  betas = schedules.get_betas('linear', 1000)
  assert betas.dtype == np.float64 and betas.shape == (1000,)
  assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
  betas_250 = schedules.get_betas('linear', 250)  # 1000/T scaling keeps ᾱ_T comparable
  assert betas_250[0] == pytest.approx(4e-4) and betas_250[-1] == pytest.approx(0.08)


def test_cosine_alpha_bar_equals_formula():
  T, s = 1000, 0.008
  alpha_bar = np.cumprod(1 - schedules.get_betas('cosine', T))
  t = np.arange(1, T + 1)
  expected = np.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 / np.cos(s / (1 + s) * math.pi / 2) ** 2
  # Identical up to the last step, where β is clipped at 0.999.
  np.testing.assert_allclose(alpha_bar[:-1], expected[:-1], rtol=1e-10)
  assert schedules.get_betas('cosine', T)[-1] == 0.999


@pytest.mark.parametrize('name', ['vp', 'geometric'])
def test_ddgan_discretisations_match_definitions(name):
  T, eps_small = 4, 1e-3
  beta_min, beta_max = (0.1, 20.0) if name == 'vp' else (0.01, 0.9)
  t = np.arange(T + 1) / T * (1 - eps_small) + eps_small
  if name == 'vp':
    var = 1 - np.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)
  else:
    var = beta_min * (beta_max / beta_min) ** t
  alpha_bars = 1 - var
  ddgan_betas = np.concatenate([[1e-8], 1 - alpha_bars[1:] / alpha_bars[:-1]])  # DDGAN's get_sigma_schedule
  betas = schedules.get_betas(name, T, beta_min=beta_min, beta_max=beta_max)
  np.testing.assert_allclose(betas, ddgan_betas[1:], rtol=1e-12)  # DDGAN's posterior drops the first β
  # ᾱ of step k−1 is DDGAN's ᾱ_k relative to its (near-clean) first grid point.
  np.testing.assert_allclose(np.cumprod(1 - betas), alpha_bars[1:] / alpha_bars[0], rtol=1e-12)


def test_ddgan_vp_cifar_values():
  # DDGAN CIFAR-10 (T=4, β_min 0.1, β_max 20): ᾱ at t=1 is exp(−10.05); the last β is large.
  betas = schedules.get_betas('vp', 4)
  assert np.prod(1 - betas) == pytest.approx(np.exp(-0.5 * 19.9 - 0.1) / (1 - (1 - np.exp(
      -0.5 * 1e-6 * 19.9 - 1e-3 * 0.1))), rel=1e-9)
  assert 0.9 < betas[-1] < 1


def iddpm_space_timesteps(num_timesteps, count):
  """improved_diffusion/respace.py space_timesteps(T, [count]) (one section), restated."""
  frac_stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
  cur_idx, taken = 0.0, []
  for _ in range(count):
    taken.append(round(cur_idx))
    cur_idx += frac_stride
  return sorted(set(taken))


def test_num_steps_not_dividing_T_is_iddpm_even_spacing_ending_at_T_minus_1():
  for T in (50, 1000, 4000):
    for N in range(2, T + 1):
      if T % N:
        got = schedules.spaced_timesteps(T, num_steps=N)
        assert list(got) == iddpm_space_timesteps(T, N), (T, N)
        assert got[-1] == T - 1 and len(got) == N
  # The case: N = 600 of T = 1000 used to stop at t = 599 (ᾱ = 0.34) and start from pure noise there.
  betas = schedules.get_betas('cosine', 1000)
  spaced = schedules.spaced_schedule(betas, num_steps=600)
  assert int(spaced.timesteps[-1]) == 999
  assert float(spaced.alphas_cumprod[-1]) == pytest.approx(np.cumprod(1 - betas)[-1], rel=1e-5)
  assert float(spaced.alphas_cumprod[-1]) < 1e-6


def test_spaced_timesteps():
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, num_steps=50), np.arange(0, 1000, 20))
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, step_size=10), np.arange(0, 1000, 10))
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, num_steps=3), [0, 500, 999])
  np.testing.assert_array_equal(schedules.spaced_timesteps(7), np.arange(7))


def test_respacing_keeps_alpha_bar_and_maps_back():
  betas = schedules.get_betas('cosine', 1000)
  spaced = schedules.spaced_schedule(betas, num_steps=50)
  kept = np.arange(0, 1000, 20)
  np.testing.assert_array_equal(np.asarray(spaced.timesteps), kept)
  np.testing.assert_allclose(np.asarray(spaced.alphas_cumprod), np.cumprod(1 - betas)[kept], rtol=1e-6)
  assert float(spaced.alphas_cumprod_prev[0]) == 1.0  # the last step lands on x̂0
  full = schedules.spaced_schedule(betas)
  np.testing.assert_allclose(np.asarray(full.betas), betas.astype(np.float32), rtol=1e-6)


def test_schedule_derived_arrays():
  betas = schedules.get_betas('linear', 1000)
  sched = schedules.make_schedule(betas)
  alpha_bar = np.cumprod(1 - betas)
  alpha_bar_prev = np.append(1, alpha_bar[:-1])
  posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
  for name, expected in [('alphas_cumprod', alpha_bar), ('sqrt_one_minus_alphas_cumprod', np.sqrt(1 - alpha_bar)),
                         ('posterior_variance', posterior_variance), ('log_betas', np.log(betas))]:
    array = getattr(sched, name)
    assert array.dtype == np.float32
    np.testing.assert_allclose(np.asarray(array), expected, rtol=1e-5, atol=1e-30, err_msg=name)
  assert float(sched.posterior_variance[0]) == 0.0
  np.testing.assert_allclose(float(sched.posterior_log_variance_clipped[0]), np.log(posterior_variance[1]),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sched.fixed_large_log_variance[1:]), np.log(betas[1:]), rtol=1e-5)


@pytest.mark.parametrize('call, key', [
    (lambda: schedules.get_betas('quadratic', 1000), 'schedule'),
    (lambda: schedules.get_betas('linear', 0), 'num_timesteps'),
    (lambda: schedules.get_betas('linear', 10), 'num_timesteps'),
    (lambda: schedules.get_betas('geometric', 4, beta_min=0.1, beta_max=20.0), 'geometric'),
    (lambda: schedules.spaced_timesteps(1000, num_steps=1001), 'num_steps'),
    (lambda: schedules.spaced_timesteps(1000, step_size=0), 'step_size'),
    (lambda: schedules.spaced_timesteps(1000, num_steps=10, step_size=10), 'num_steps/step_size'),
])
def test_bad_input_is_one_line(call, key):
  with pytest.raises(ConfigError) as error:
    call()
  message = str(error.value)
  assert message.startswith(key) and 'allowed' in message and '\n' not in message
