"""Samplers against an exact model.

For data x0 ~ N(μ, s²) the optimal denoiser is closed form, E[ε|x_t] = √(1−ᾱ)(x_t − √ᾱμ)/(ᾱs² + 1 − ᾱ), and every
sampler here is then a linear-Gaussian recursion whose output moments are computable exactly in float64. Each
sampler's empirical mean/std must match (a) those exact moments of the discretised sampler within Monte-Carlo
error, and (b) the data's μ and s within the sampler's known discretisation error.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import samplers, schedules
from ddjax.validation import ConfigError

MU, S, T = 0.3, 0.5, 1000
BETAS = schedules.get_betas('cosine', T)
ALPHA_BAR = np.cumprod(1 - BETAS)
SHAPE = (2048, 2, 2, 1)  # 8192 scalar samples: SE(mean) = s/90, SE(std) ≈ s/128
AB = jnp.asarray(ALPHA_BAR, jnp.float32)


def exact_output(prediction, mu=MU):
  def model_fn(x_t, t, labels):
    a = AB[t].reshape(-1, 1, 1, 1)
    eps = jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * S * S + 1 - a)
    x0 = (x_t - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return {'eps': eps, 'x0': x0, 'v': jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction]
  return model_fn


MODELS = {p: exact_output(p) for p in ('eps', 'x0', 'v')}  # module-level: the compiled loop is reused


def exact_moments(kept, rule, mu=MU):
  """Mean and std of the sampler's output for x_T ~ N(0, 1), written from the papers' update rules in float64.

  Centred c = x − √ᾱ·μ evolves linearly: c_prev = A·c + σ·z, where x̂0 − μ = √ᾱ s² c / D and ε̂ = √(1−ᾱ) c / D,
  D = ᾱs² + 1 − ᾱ.
  """
  ab = ALPHA_BAR[kept]
  ab_prev = np.append(1.0, ab[:-1])
  if rule[0] == 'dpm++2m':
    return dpm_solver_moments(ab, mu)
  c_mean, c_var = -np.sqrt(ab[-1]) * mu, 1.0
  for i in range(len(kept) - 1, -1, -1):
    a, a_prev = ab[i], ab_prev[i]
    beta = 1 - a / a_prev
    posterior_var = beta * (1 - a_prev) / (1 - a)
    gain_x0, gain_eps = np.sqrt(a) * S * S / (a * S * S + 1 - a), np.sqrt(1 - a) / (a * S * S + 1 - a)
    if rule[0] == 'ddpm':  # μ̃ = c1·x̂0 + c2·x_t
      c1, c2 = beta * np.sqrt(a_prev) / (1 - a), (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
      gain, noise_var = c1 * gain_x0 + c2, posterior_var
    else:  # √ᾱ_prev·x̂0 + √(direction)·ε̂ + σ z
      noise_var = rule[1] ** 2 * posterior_var if rule[0] == 'eta' else rule[1] * posterior_var
      direction = max(1 - a_prev - (noise_var if rule[0] == 'eta' else rule[1] * posterior_var), 0.0)
      gain = np.sqrt(a_prev) * gain_x0 + np.sqrt(direction) * gain_eps
    c_mean, c_var = gain * c_mean, gain**2 * c_var + (noise_var if i > 0 else 0.0)
  return mu + c_mean, np.sqrt(c_var)


def dpm_solver_moments(ab, mu):
  """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) on the exact x̂0 = μ + √ᾱ s² (x − √ᾱ μ)/D, D = ᾱs² + 1 − ᾱ, written
  with λ = log(√ᾱ/√(1−ᾱ)): x' = (σ'/σ)·x − α'(e^{−h} − 1)·(x̂0 + (x̂0 − x̂0_last)·h/(2h_last)), h = λ' − λ, first order
  at the first step and at the last, which returns x̂0. Deterministic and affine in x_T: x = p·x_T + q."""
  p, q = 1.0, 0.0
  last_x0, last_h = None, None
  for i in range(len(ab) - 1, -1, -1):
    a = ab[i]
    gain = np.sqrt(a) * S * S / (a * S * S + 1 - a)
    x0 = (gain * p, mu + gain * (q - np.sqrt(a) * mu))
    if i == 0:
      return x0[1], abs(x0[0])
    a_prev = ab[i - 1]
    h = 0.5 * np.log(a_prev / (1 - a_prev)) - 0.5 * np.log(a / (1 - a))
    d = x0 if last_x0 is None else tuple(x + (x - y) * h / (2 * last_h) for x, y in zip(x0, last_x0))
    ratio, weight = np.sqrt((1 - a_prev) / (1 - a)), -np.sqrt(a_prev) * np.expm1(-h)
    p, q = ratio * p + weight * d[0], ratio * q + weight * d[1]
    last_x0, last_h = x0, h


DEFAULT_50 = schedules.spaced_timesteps(T, num_steps=50)
CASES = [  # (name, sample kwargs, exact rule, kept steps, tolerance of the exact moments vs (μ, s))
    ('ddpm T=1000', dict(sampler='ddpm'), ('ddpm',), np.arange(T), 0.01),
    ('ddim eta=0 50 steps', dict(sampler='ddim', num_steps=50), ('eta', 0.0), DEFAULT_50, 0.05),
    ('ddim eta=1 50 steps', dict(sampler='ddim', num_steps=50, eta=1.0), ('eta', 1.0), DEFAULT_50, 0.08),
    ('ddim_scale 0 step_size 10', dict(sampler='ddim', step_size=10, ddim_scale=0.0), ('scale', 0.0),
     np.arange(0, T, 10), 0.03),
    ('ddim_scale 1 step_size 10', dict(sampler='ddim', step_size=10, ddim_scale=1.0), ('scale', 1.0),
     np.arange(0, T, 10), 0.05),
    ('ddpm respaced 50 leading', dict(sampler='ddpm', num_steps=50, spacing='leading'), ('ddpm',),
     np.arange(0, T, 20), 0.08),
    # Second order: on the default grid 20 steps land closer to (μ, s) than DDIM's 50; on IDDPM's even grid the
    # step out of t = T−1 (λ far below the rest) overshoots the spread at few steps.
    ('dpm++2m 20 steps', dict(sampler='dpm++2m', num_steps=20), ('dpm++2m',),
     schedules.spaced_timesteps(T, num_steps=20), 0.005),
    ('dpm++2m 10 steps even', dict(sampler='dpm++2m', num_steps=10, spacing='even'), ('dpm++2m',),
     schedules.spaced_timesteps(T, num_steps=10, spacing='even'), 0.3),
]


# Every sampler with eps prediction; the x0 and v parametrisations on the two main samplers.
RUNS = [case + ('eps',) for case in CASES] + [case + (p,) for case in CASES[:2] for p in ('x0', 'v')]


@pytest.mark.parametrize('name, kwargs, rule, kept, discretisation, prediction', RUNS,
                         ids=[f'{r[0]} [{r[-1]}]' for r in RUNS])
def test_sampler_matches_exact_moments(name, kwargs, rule, kept, discretisation, prediction):
  x = np.asarray(samplers.sample(MODELS[prediction], BETAS, shape=SHAPE, rng=jax.random.key(0),
                                 prediction=prediction, **kwargs), np.float64)
  exact_mean, exact_std = exact_moments(kept, rule)
  n = x.size
  print(f'{name} [{prediction}]: mean {x.mean():.4f} (exact {exact_mean:.4f}), std {x.std():.4f} '
        f'(exact {exact_std:.4f}); data μ={MU} s={S}')
  assert abs(x.mean() - exact_mean) < 4.5 * exact_std / np.sqrt(n)
  assert abs(x.std() - exact_std) < 4.5 * exact_std / np.sqrt(2 * n)
  assert abs(exact_mean - MU) < discretisation * S and abs(exact_std - S) < discretisation * S


def test_ddim_eta1_equals_ddpm_posterior_variance():
  # On the same strided grid, DDIM η=1 and respaced DDPM have the same exact moments (DDIM paper, §4.1).
  kept = np.arange(0, T, 20)
  np.testing.assert_allclose(exact_moments(kept, ('eta', 1.0)), exact_moments(kept, ('ddpm',)), rtol=1e-9)
  a = samplers.sample(MODELS['eps'], BETAS, shape=SHAPE, rng=jax.random.key(3), num_steps=50, eta=1.0,
                      spacing='leading')
  b = samplers.sample(MODELS['eps'], BETAS, shape=SHAPE, rng=jax.random.key(3), num_steps=50, sampler='ddpm',
                      spacing='leading')
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)  # same noise, same update


def _class_model(num_classes):
  """Exact denoiser for class-conditional Gaussians: class c has mean μ_c = c/10, the null class mean 0.5."""
  means = jnp.append(jnp.arange(num_classes) / 10.0, 0.5)

  def model_fn(x_t, t, labels):
    a = AB[t].reshape(-1, 1, 1, 1)
    mu = means[labels].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * S * S + 1 - a)
  return model_fn


CLASS_MODEL = _class_model(10)


def test_guidance_zero_is_conditional_sampling():
  labels = jnp.full((SHAPE[0],), 7, jnp.int32)
  guided = samplers.classifier_free_guidance(CLASS_MODEL, guidance=0.0, num_classes=10, mean_channels=1)
  x_t = jax.random.normal(jax.random.key(1), SHAPE)
  t = jnp.full((SHAPE[0],), 500, jnp.int32)
  np.testing.assert_array_equal(guided(x_t, t, labels), CLASS_MODEL(x_t, t, labels))
  plain = samplers.sample(CLASS_MODEL, BETAS, shape=SHAPE, rng=jax.random.key(2), num_steps=50, labels=labels,
                          num_classes=10)
  x = np.asarray(plain)
  exact_mean, _ = exact_moments(DEFAULT_50, ('eta', 0.0), mu=0.7)
  assert abs(x.mean() - exact_mean) < 0.02


def test_guidance_extrapolates_class_mean():
  # ε is affine in μ, so (1+w)ε(μ_c) − wε(μ_∅) is the exact denoiser of μ_c + w(μ_c − μ_∅).
  w, c = 2.0, 7
  labels = jnp.full((SHAPE[0],), c, jnp.int32)
  x = np.asarray(samplers.sample(CLASS_MODEL, BETAS, shape=SHAPE, rng=jax.random.key(4), num_steps=50,
                                 guidance=w, labels=labels, num_classes=10))
  target = c / 10 + w * (c / 10 - 0.5)
  exact_mean, exact_std = exact_moments(DEFAULT_50, ('eta', 0.0), mu=target)
  assert abs(x.mean() - exact_mean) < 4.5 * exact_std / np.sqrt(x.size)
  assert abs(exact_mean - target) < 0.05 * S


def test_guidance_is_one_batched_forward():
  calls = []

  def counting(x_t, t, labels):
    calls.append(x_t.shape[0])
    return CLASS_MODEL(x_t, t, labels)

  labels = jnp.zeros((4,), jnp.int32)
  samplers.sample(counting, BETAS, shape=(4, 2, 2, 1), rng=jax.random.key(0), num_steps=5, guidance=1.0,
                  labels=labels, num_classes=10)
  assert calls == [8]  # traced once, with cond and null stacked


@pytest.mark.parametrize('sampler', samplers.SAMPLERS)
def test_one_network_evaluation_per_step(sampler):
  # N steps are N network evaluations at run time (a callback counts them), for every sampler and grid size.
  evaluations = []

  def counting(x_t, t, labels):
    jax.debug.callback(lambda: evaluations.append(1))
    return MODELS['eps'](x_t, t, labels)

  for num_steps in (1, 7):
    evaluations.clear()
    jax.block_until_ready(samplers.sample(counting, BETAS, shape=(2, 2, 2, 1), rng=jax.random.key(0),
                                          sampler=sampler, num_steps=num_steps))
    assert len(evaluations) == num_steps
  # Inside an enclosing jit (as generate and --mode sweep call it), the same samples.
  inside = jax.jit(lambda rng: samplers.sample(MODELS['eps'], BETAS, shape=(2, 2, 2, 1), rng=rng, sampler=sampler,
                                               num_steps=7))(jax.random.key(0))
  outside = samplers.sample(MODELS['eps'], BETAS, shape=(2, 2, 2, 1), rng=jax.random.key(0), sampler=sampler,
                            num_steps=7)
  np.testing.assert_allclose(inside, outside, rtol=1e-6, atol=1e-6)


def test_random_labels_never_null():
  labels = np.asarray(samplers.draw_labels(jax.random.key(0), 20000, num_classes=10))
  assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
  np.testing.assert_array_equal(samplers.draw_labels(jax.random.key(0), 3, num_classes=10, class_label=4), [4] * 3)


def test_compiles_once_per_shape_and_per_example_noise():
  model_fn = MODELS['eps']
  compiled = samplers._sample_loop._cache_size()
  a = samplers.sample(model_fn, BETAS, shape=(8, 2, 2, 1), rng=jax.random.key(0), num_steps=20, eta=0.5)
  b = samplers.sample(model_fn, BETAS, shape=(8, 2, 2, 1), rng=jax.random.key(1), num_steps=20, eta=0.3)
  assert samplers._sample_loop._cache_size() == compiled + 1 and not np.allclose(a, b)
  samplers.sample(model_fn, BETAS, shape=(4, 2, 2, 1), rng=jax.random.key(0), num_steps=20)
  assert samplers._sample_loop._cache_size() == compiled + 2
  # Each example's noise comes from its own key (folded from its index): a larger batch from the same rng and
  # settings starts with the same examples, so a padded batch leaves the real samples unchanged.
  big = samplers.sample(model_fn, BETAS, shape=(16, 2, 2, 1), rng=jax.random.key(0), num_steps=20, eta=0.5)
  np.testing.assert_allclose(big[:8], a, rtol=1e-6, atol=1e-6)
  assert not np.allclose(big[8:], a)
  # [B] keys, one per example, give the same samples as the single key they were folded from.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(8))
  np.testing.assert_array_equal(
      samplers.sample(model_fn, BETAS, shape=(8, 2, 2, 1), rng=keys, num_steps=20, eta=0.5), a)


def test_every_sampler_and_step_count_starts_from_the_same_x_T():
  # ε̂ = 0 makes x̂0 = x_t/√ᾱ_t, and both deterministic updates then carry x_T to x_T/√ᾱ_t at the chain's first
  # step, which is T − 1 on the trailing grid for every N: equal outputs iff the chains start from the same x_T.
  def zero_eps(x_t, t, labels):
    return jnp.zeros_like(x_t)
  first = float(np.sqrt(np.cumprod(1.0 - np.asarray(BETAS, np.float64))[-1]))
  x_T = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (3, 3, 1)))(
      jax.vmap(lambda k: jax.random.split(k, 2)[0])(samplers.per_example_keys(jax.random.key(0), 6))))
  for sampler, num_steps in (('ddim', 3), ('ddim', 10), ('dpm++2m', 3), ('dpm++2m', 10)):
    out = samplers.sample(zero_eps, BETAS, shape=(6, 3, 3, 1), rng=jax.random.key(0), sampler=sampler,
                          num_steps=num_steps, spacing='trailing')
    np.testing.assert_allclose(np.asarray(out) * first, x_T, rtol=1e-4, atol=1e-5, err_msg=f'{sampler} {num_steps}')


def scaled_model(params, x_t, t, labels):
  return params['scale'] * MODELS['eps'](x_t, t, labels)


def test_params_are_an_argument_not_a_constant():
  # A library user passing weights through params= gets one compilation per shape, whatever the weights.
  compiled = samplers._sample_loop._cache_size()
  outputs = [samplers.sample(scaled_model, BETAS, shape=(8, 2, 2, 1), rng=jax.random.key(0), num_steps=20,
                             params={'scale': jnp.float32(scale)}) for scale in (1.0, 0.5)]
  assert samplers._sample_loop._cache_size() == compiled + 1
  np.testing.assert_allclose(outputs[0], samplers.sample(MODELS['eps'], BETAS, shape=(8, 2, 2, 1),
                                                         rng=jax.random.key(0), num_steps=20), atol=1e-6)
  assert not np.allclose(outputs[0], outputs[1])


def test_guidance_keeps_the_conditional_variance():
  # Learned-range output [ε, v]: guidance extrapolates ε and leaves v the conditional one (GLIDE,
  # guided-diffusion), so log Σ stays within [log β̃, log β].
  def model_fn(x_t, t, labels):
    is_null = (labels == 10).astype(jnp.float32).reshape(-1, 1, 1, 1)
    eps = jnp.broadcast_to(0.1 + 0.2 * is_null, x_t.shape)
    v = jnp.broadcast_to(0.9 - 1.8 * is_null, x_t.shape)  # 0.9 conditional, −0.9 null
    return jnp.concatenate([eps, v], axis=-1)

  guided = samplers.classifier_free_guidance(model_fn, guidance=2.0, num_classes=10, mean_channels=1)
  out = guided(jnp.zeros((3, 2, 2, 1)), jnp.zeros((3,), jnp.int32), jnp.array([0, 4, 9], jnp.int32))
  np.testing.assert_allclose(out[..., 0], 3 * 0.1 - 2 * 0.3, rtol=1e-6)  # (1+w)·ε_c − w·ε_∅
  np.testing.assert_allclose(out[..., 1], 0.9)  # the conditional v, not 3·0.9 − 2·(−0.9) = 4.5


def test_clip_x0_bounds_final_sample():
  far = exact_output('eps', mu=3.0)  # data far outside [−1, 1]
  x = samplers.sample(far, BETAS, shape=(64, 2, 2, 1), rng=jax.random.key(0), num_steps=20, clip_x0=True)
  assert float(jnp.abs(x).max()) <= 1.0 + 1e-6
  unclipped = samplers.sample(far, BETAS, shape=(64, 2, 2, 1), rng=jax.random.key(0), num_steps=20)
  assert float(unclipped.mean()) == pytest.approx(3.0, abs=0.2)


def test_ddgan_posterior_sampler_with_exact_x0():
  # With G returning the exact E[x0|x_t] plus a latent-driven spread, the posterior chain still runs T=4 steps,
  # calls G with every t in T−1..0 once, and ends on G's last x̂0 exactly (no noise at t = 0).
  betas = schedules.get_betas('vp', 4)
  ab = jnp.asarray(np.cumprod(1 - betas), jnp.float32)
  seen = []

  def generator(x_t, t, z, labels):
    seen.append(z.shape)
    a = ab[t].reshape(-1, 1, 1, 1)
    x0_mean = MU + jnp.sqrt(a) * S * S * (x_t - jnp.sqrt(a) * MU) / (a * S * S + 1 - a)
    return x0_mean + z[:, :1, None, None] * 0.0

  x = samplers.sample_ddgan(generator, betas, shape=(4096, 1, 1, 1), rng=jax.random.key(0), nz=8)
  assert seen == [(4096, 8)]
  assert float(x.mean()) == pytest.approx(MU, abs=0.03)
  assert 0 < float(x.std()) < S  # a deterministic x̂0 loses the posterior spread at the last step


@pytest.mark.parametrize('kwargs, key', [
    (dict(sampler='euler'), 'sampler'),
    (dict(num_steps=10, spacing='linspace'), 'spacing'),
    (dict(x_T=jnp.zeros((4, 2, 2, 2))), 'x_T'),
    (dict(prediction='score'), 'prediction'),
    (dict(variance='learned'), 'variance'),
    (dict(num_steps=1001), 'num_steps'),
    (dict(step_size=0), 'step_size'),
    (dict(eta=-0.1), 'eta'),
    (dict(ddim_scale=-1.0), 'ddim_scale'),
    (dict(guidance=1.0), 'guidance'),
    (dict(guidance=1.0, labels=jnp.zeros((4,), jnp.int32)), 'guidance'),
])
def test_bad_input_before_tracing(kwargs, key):
  traced = []

  def model_fn(x_t, t, labels):
    traced.append(1)
    return x_t

  with pytest.raises(ConfigError) as error:
    samplers.sample(model_fn, BETAS, shape=(4, 2, 2, 1), rng=jax.random.key(0), **kwargs)
  message = str(error.value)
  assert message.startswith(key + '=') and 'allowed' in message and '\n' not in message
  assert not traced


def test_deterministic_ddim_draws_no_noise_and_matches_the_noisy_program_at_zero(monkeypatch):
  # η = 0 (or ddim_scale 0) skips z in the loop; a traced η builds the program that draws it and scales it by 0.
  draws = []
  noise = samplers._noise
  monkeypatch.setattr(samplers, '_noise', lambda *args: draws.append(1) or noise(*args))

  def noise_draws(**kwargs):  # traced once each: a shape no other test uses
    draws.clear()
    samplers.sample(MODELS['eps'], BETAS, shape=(5, 3, 3, 1), rng=jax.random.key(0), num_steps=20, **kwargs)
    return len(draws)
  assert noise_draws(eta=0.0) == noise_draws(ddim_scale=0.0) == 0  # x_T is drawn outside the loop
  assert noise_draws(eta=0.5) == noise_draws(ddim_scale=0.5) == noise_draws(sampler='ddpm') == 1
  deterministic = samplers.sample(MODELS['eps'], BETAS, shape=(8, 2, 2, 1), rng=jax.random.key(0), num_steps=20)
  traced = jax.jit(lambda eta: samplers.sample(MODELS['eps'], BETAS, shape=(8, 2, 2, 1), rng=jax.random.key(0),
                                               num_steps=20, eta=eta))(jnp.float32(0.0))
  np.testing.assert_allclose(deterministic, traced, rtol=1e-6, atol=1e-6)


# -- DPM-Solver++(2M) against diffusers (tests/fixtures/make_sampler_fixtures.py wrote the reference). ------------

REFERENCE = np.load(pathlib.Path(__file__).parent / 'fixtures' / 'sampler_reference.npz')
REF_ALPHA_BAR = jnp.asarray(np.cumprod(1 - REFERENCE['betas']), jnp.float32)


def reference_network(prediction):
  """The fixture's closed-form network: eps = √(1−ᾱ)(x − √ᾱ μ_c)/(ᾱ s² + 1 − ᾱ) + 0.05 sin(2x + t/100),
  μ_c = c/10, μ_∅ = 0.5, s = 0.5; v = √ᾱ eps − √(1−ᾱ) x̂0."""
  def model_fn(x_t, t, labels):
    a = REF_ALPHA_BAR[t].reshape(-1, 1, 1, 1)
    tt = t.astype(jnp.float32).reshape(-1, 1, 1, 1)
    mu = jnp.where(labels == 10, 0.5, labels / 10.0).reshape(-1, 1, 1, 1)
    eps = jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * S * S + 1 - a) + 0.05 * jnp.sin(2 * x_t + tt / 100)
    if prediction == 'eps':
      return eps
    x0 = (x_t - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
  return model_fn


REFERENCE_NETWORKS = {p: reference_network(p) for p in ('eps', 'v')}
DPM_CASES = sorted(name.removeprefix('dpm_').removesuffix('_x0') for name in REFERENCE.files
                   if name.startswith('dpm_') and name.endswith('_x0'))


@pytest.mark.parametrize('case', DPM_CASES)
def test_dpm_solver_equals_diffusers(case):
  # diffusers' DPMSolverMultistepScheduler(dpmsolver++, order 2, lower_order_final, final sigma 0) ran the same
  # network in float64 on the same grid from the same x_T; ddjax's float32 loop must land within 1e-4.
  prediction, *rest = case.split('_')
  guidance = 2.0 if 'guided' in rest and prediction == 'eps' else 1.5 if 'guided' in rest else 0.0
  spacing, num_steps = rest[-2], int(rest[-1])
  timesteps = REFERENCE[f'dpm_{case}_timesteps']
  betas = REFERENCE['betas']
  np.testing.assert_array_equal(schedules.spaced_timesteps(len(betas), num_steps=num_steps, spacing=spacing)[::-1],
                                timesteps)
  x_T = jnp.asarray(REFERENCE['x_T'], jnp.float32)
  got = samplers.sample(REFERENCE_NETWORKS[prediction], betas, shape=x_T.shape, rng=jax.random.key(0),
                        sampler='dpm++2m', num_steps=num_steps, spacing=spacing, prediction=prediction,
                        guidance=guidance, labels=jnp.asarray(REFERENCE['labels'], jnp.int32), num_classes=10,
                        x_T=x_T)
  expected = REFERENCE[f'dpm_{case}_x0']
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4 * np.abs(expected).max())
