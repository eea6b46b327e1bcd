"""Schedules against their closed forms (IDDPM, DDGAN) and respacing against IDDPM's SpacedDiffusion."""
import hashlib
import math
import pathlib

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


REFERENCE = np.load(pathlib.Path(__file__).parent / 'fixtures' / 'sampler_reference.npz')


def digest(grid) -> np.uint64:
  """tests/fixtures/make_sampler_fixtures.py's digest of a grid (descending int64)."""
  return np.frombuffer(hashlib.sha256(np.asarray(grid, np.int64).tobytes()).digest()[:8], np.uint64)[0]


@pytest.mark.parametrize('spacing', schedules.SPACINGS)
@pytest.mark.parametrize('T', [1000, 4000])
def test_spacing_equals_the_reference_grids(spacing, T):
  # 'even': improved-diffusion's space_timesteps(T, "N"); 'leading' / 'trailing': diffusers' DDIMScheduler; for
  # every N in 2..T (the fixture holds a digest of each reference grid).
  expected = REFERENCE[f'{spacing}_{T}']
  for N in range(2, T + 1):
    grid = schedules.spaced_timesteps(T, num_steps=N, spacing=spacing)
    assert len(grid) == N and np.all(np.diff(grid) > 0), (N, grid)
    assert digest(grid[::-1]) == expected[N - 2], (spacing, T, N)
    assert grid[-1] == {'even': T - 1, 'leading': (N - 1) * (T // N), 'trailing': T - 1}[spacing]
    assert grid[0] == {'even': 0, 'leading': 0, 'trailing': round(T / N) - 1}[spacing]


def test_trailing_keeps_n_steps_where_diffusers_emits_one_more():
  # diffusers' float arange over T/N yields an N+1-th timestep, −1 (past the schedule), for some N; ddjax keeps N.
  for T in (1000, 4000):
    extra = REFERENCE[f'trailing_{T}_extra']
    assert len(extra) > 0 and np.all(REFERENCE[f'trailing_{T}_extra_value'] == -1)
    assert len(REFERENCE[f'leading_{T}_extra']) == 0
    for N in extra:
      assert len(schedules.spaced_timesteps(T, num_steps=int(N), spacing='trailing')) == N


def test_the_default_grid_starts_from_pure_noise():
  # A short chain on a grid that starts below T−1 starts from N(0, I) at a noise level that is not pure noise:
  # √ᾱ = 0.154 at t = 900 (leading, 10 steps of the cosine schedule); 'even' and 'trailing' start at T−1.
  alpha_bar = np.cumprod(1 - schedules.get_betas('cosine', 1000))
  starts = {s: schedules.spaced_timesteps(1000, num_steps=10, spacing=s)[-1] for s in schedules.SPACINGS}
  assert starts == {'even': 999, 'leading': 900, 'trailing': 999}
  assert np.sqrt(alpha_bar[900]) == pytest.approx(0.154, abs=1e-3)
  assert schedules.spaced_timesteps(1000, num_steps=10)[-1] == 999
  spaced = schedules.spaced_schedule(schedules.get_betas('cosine', 1000), num_steps=600, spacing='even')
  assert int(spaced.timesteps[-1]) == 999 and float(spaced.alphas_cumprod[-1]) < 1e-6


def test_spaced_timesteps():
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, num_steps=50, spacing='leading'),
                                np.arange(0, 1000, 20))
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, num_steps=4, spacing='trailing'), [249, 499, 749, 999])
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, num_steps=3, spacing='even'), [0, 500, 999])
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, num_steps=1, spacing='even'), [0])
  np.testing.assert_array_equal(schedules.spaced_timesteps(1000, step_size=10), np.arange(0, 1000, 10))
  np.testing.assert_array_equal(schedules.spaced_timesteps(7), np.arange(7))


def test_respacing_keeps_alpha_bar_and_maps_back():
  betas = schedules.get_betas('cosine', 1000)
  spaced = schedules.spaced_schedule(betas, num_steps=50, spacing='leading')
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
    (lambda: schedules.spaced_timesteps(1000, num_steps=10, spacing='linspace'), 'spacing'),
    (lambda: schedules.spaced_timesteps(1000, step_size=0), 'step_size'),
    (lambda: schedules.spaced_timesteps(1000, num_steps=10, step_size=10), 'num_steps/step_size'),
])
def test_bad_input_is_one_line(call, key):
  with pytest.raises(ConfigError) as error:
    call()
  message = str(error.value)
  assert message.startswith(key) and 'allowed' in message and '\n' not in message
