"""DDGAN: the GAN objective against the formulas of DDGAN's code (written out here in numpy, not imported), the
sampler's generator calls, and training through the one loop: exact resume, SIGTERM on 8 devices, the NaN guard,
the lock, corrupt checkpoints, `--mode sample`."""
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import checkpoint, config as config_lib, data, generate, samplers, schedules, train
from ddjax import workdir as workdir_lib
from ddjax.config import load_config_module
from ddjax.methods import ddgan
from ddjax.models import create_discriminator, create_model
from ddjax.validation import ConfigError
from ddjax.workdir import WorkdirError
from tests.tiny import REPO, logged, main_args, restore_state, run_processes, tiny_ddgan_config, xla_flags

T = 4


def ddgan_coefficients(num_timesteps, beta_min=0.1, beta_max=20.0):
  """DDGAN's get_sigma_schedule, Diffusion_Coefficients and Posterior_Coefficients (train_ddgan.py): the VP
  variance on t_k = k/T·(1 − 10⁻³) + 10⁻³ in float64, betas with 1e-8 prepended and cast to float32 as its code
  does (so √(1 − 10⁻⁸) is 1 and x_0 is the data itself), the cumulative coefficients from all T + 1 betas and the
  posterior from the last T."""
  t = np.arange(num_timesteps + 1) / num_timesteps * (1 - 1e-3) + 1e-3
  log_mean_coeff = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
  alpha_bars = np.exp(2 * log_mean_coeff)
  betas = np.concatenate([[1e-8], 1 - alpha_bars[1:] / alpha_bars[:-1]]).astype(np.float32)
  a_s_cum = np.cumprod(np.sqrt(1 - betas))
  posterior_betas = betas[1:]
  alphas_cumprod = np.cumprod(1 - posterior_betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  return {
      'a_s': np.sqrt(1 - betas), 'sigmas': np.sqrt(betas), 'a_s_cum': a_s_cum,
      'sigmas_cum': np.sqrt(1 - a_s_cum**2),
      'posterior_variance': posterior_betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
      'coef1': posterior_betas * np.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
      'coef2': (1 - alphas_cumprod_prev) * np.sqrt(1 - posterior_betas) / (1 - alphas_cumprod),
  }


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule(schedules.get_betas('vp', T))


def test_q_sample_pairs_are_ddgans(schedule):
  reference = ddgan_coefficients(T)
  rng = np.random.default_rng(0)
  x0, noise, noise_next = (rng.standard_normal((T, 3, 3, 1)).astype(np.float32) for _ in range(3))
  t = np.arange(T)
  x_t, x_next = ddgan.q_sample_pair(schedule, x0=x0, t=jnp.asarray(t), noise=noise, noise_next=noise_next)
  column = lambda name, index: reference[name][index][:, None, None, None]
  want_t = column('a_s_cum', t) * x0 + column('sigmas_cum', t) * noise
  want_next = column('a_s', t + 1) * want_t + column('sigmas', t + 1) * noise_next
  np.testing.assert_allclose(x_t, want_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x_next, want_next, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(x_t[0], x0[0])  # x_0 is the data itself (in float32)


def test_posterior_sample_is_ddgans(schedule):
  reference = ddgan_coefficients(T)
  rng = np.random.default_rng(1)
  x0, x_next, noise = (rng.standard_normal((T, 3, 3, 1)).astype(np.float32) for _ in range(3))
  t = np.arange(T)
  got = ddgan.posterior_sample(schedule, x0=x0, x_next=x_next, t=jnp.asarray(t), noise=noise)
  column = lambda name: reference[name][t][:, None, None, None]
  nonzero = (t > 0)[:, None, None, None]
  want = (column('coef1') * x0 + column('coef2') * x_next
          + nonzero * np.sqrt(np.maximum(column('posterior_variance'), 1e-20)) * noise)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_r1_penalty_is_the_analytic_squared_gradient_norm():
  # D(x)_b = sin(w·x_b): ∇_{x_b} Σ D = cos(w·x_b)·w, so the penalty is γ/2 · mean_b cos²(w·x_b)·‖w‖².
  rng = np.random.default_rng(2)
  x, w = rng.standard_normal((5, 2, 2, 3)), rng.standard_normal((2, 2, 3))
  discriminate = lambda x: jnp.sin(jnp.sum(x * w, axis=(1, 2, 3)))
  want = 0.3 / 2 * np.mean(np.cos(np.sum(x * w, axis=(1, 2, 3)))**2 * np.sum(w**2))
  got = ddgan.r1_penalty(discriminate, jnp.asarray(x, jnp.float32), r1_gamma=0.3)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_non_saturating_losses():
  real, fake = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0])
  softplus = lambda v: np.log1p(np.exp(v))
  want_d = np.mean(softplus(-np.array([2.0, -1.0]))) + np.mean(softplus(np.array([0.5, -3.0])))
  assert float(ddgan.discriminator_loss(real, fake)) == pytest.approx(want_d, rel=1e-6)
  assert float(ddgan.generator_loss(fake)) == pytest.approx(np.mean(softplus(-np.array([0.5, -3.0]))), rel=1e-6)


def test_learning_rate_decays_by_the_cosine_to_1e_5():
  rate = ddgan.learning_rate_schedule(1e-3, decay_steps=100)
  np.testing.assert_allclose([float(rate(n)) for n in (0, 50, 100, 150)],
                             [1e-3, 1e-5 + (1e-3 - 1e-5) / 2, 1e-5, 1e-5], rtol=1e-5)
  assert float(ddgan.learning_rate_schedule(1e-3, decay_steps=0)(70)) == pytest.approx(1e-3)


def test_sampler_makes_exactly_T_generator_calls():
  calls = []

  def generator(x_t, t, z, labels):
    jax.debug.callback(lambda step: calls.append(int(step[0])), t)
    return jnp.tanh(x_t + z[:, :1, None, None])

  x = samplers.sample_ddgan(generator, schedules.get_betas('vp', T), shape=(3, 2, 2, 1), rng=jax.random.key(0),
                            nz=4)
  jax.block_until_ready(x)
  assert calls == [3, 2, 1, 0]


# ----------------------------------------------------------------------------------------------------------------
# The networks a config builds
# ----------------------------------------------------------------------------------------------------------------

def network_counts(config):
  """(generator, discriminator) parameter counts of `config`'s networks, from shapes alone (nothing runs)."""
  size, channels = config.data.image_size, config.data.num_channels
  x, t = jax.ShapeDtypeStruct((4, size, size, channels), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32)
  z = jax.ShapeDtypeStruct((4, config.gan.nz), jnp.float32)
  labels = jax.ShapeDtypeStruct((4,), jnp.int32) if config.data.num_classes else None
  generator, discriminator = create_model(config), create_discriminator(config)
  g = jax.eval_shape(lambda k, x, t, z, y: generator.init(k, x, t, z, y, train=False), jax.random.key(0), x, t, z,
                     labels)
  d = jax.eval_shape(lambda k, x, t, y: discriminator.init(k, x, t, x, y, train=False), jax.random.key(0), x, t,
                     labels)
  return tuple(sum(leaf.size for leaf in jax.tree.leaves(tree)) for tree in (g, d))


# The reference's counts (tests/test_ncsnpp.py says how they were taken): the paper configs must build exactly
# the networks whose NVlabs checkpoints ddjax.pretrained imports.
@pytest.mark.parametrize('name, generator_count, discriminator_count', [
    ('cifar10_ddgan.py', 48_432_515, 12_741_633),
    ('celebahq256_ddgan.py', 39_726_979, 27_737_217),
    ('lsun_church256_ddgan.py', 39_726_979, 27_737_217),
])
def test_paper_configs_build_the_reference_networks(name, generator_count, discriminator_count):
  config = load_config_module(os.path.join(REPO, 'configs', name)).get_config()
  assert config.gan.t_emb_dim == 256
  assert network_counts(config) == (generator_count, discriminator_count)


def test_t_emb_dim_sets_the_discriminator_time_embedding():
  """D's time MLP is two dense layers t_emb_dim -> t_emb_dim, and each of its four blocks projects the embedding
  to its width (2, 4, 8, 8 x ngf = 16, 32, 64, 64 at d_ch 8): 2·(d² + d) + 176·d parameters depend on d."""
  counts = {dim: network_counts(tiny_ddgan_config(None, **{'gan.t_emb_dim': dim})) for dim in (256, 32)}
  assert counts[256][0] == counts[32][0]
  depends = lambda d: 2 * (d * d + d) + 176 * d
  assert counts[256][1] - counts[32][1] == depends(256) - depends(32)


# ----------------------------------------------------------------------------------------------------------------
# Training through the one loop (in-process, one device; the CLI on 8)
# ----------------------------------------------------------------------------------------------------------------

STEPS = 8
RUN = {'train.num_steps': STEPS, 'train.log_every': 1, 'train.checkpoint_every': 2, 'train.sample_every': 0,
       'train.keep_checkpoints': 10}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def straight(data_dir, tmp_path_factory):
  """The reference: 8 DDGAN steps without a fault, checkpoints every 2 steps."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  train.train_and_evaluate(tiny_ddgan_config(data_dir, **RUN), workdir)
  return workdir


def assert_same_state(workdir, reference, data_dir, step=STEPS):
  """G and D params, both optimizer states, the EMA, step and RNG of checkpoint `step`, bitwise."""
  config = tiny_ddgan_config(data_dir, **RUN)
  got, want = restore_state(workdir, config, step), restore_state(reference, config, step)
  for field in ('step', 'params', 'ema_params', 'opt_state', 'rng'):
    for a, b in zip(jax.tree.leaves(getattr(got, field)), jax.tree.leaves(getattr(want, field)), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)


def test_ddgan_trains_logs_and_samples(straight, data_dir):
  state = restore_state(straight, tiny_ddgan_config(data_dir, **RUN))
  assert set(state.params) == {'generator', 'discriminator'} == set(state.opt_state)
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params['generator'])
  records = logged(straight, 'loss_d')
  assert sorted(records) == list(range(1, STEPS + 1))
  r1 = logged(straight, 'r1')
  assert all(r1[step] > 0 for step in (1, 3, 5, 7)) and all(r1[step] == 0 for step in (2, 4, 6, 8))  # lazy_reg 2
  for key in ('loss_g', 'loss', 'd_real', 'd_fake', 'd_real_spread', 'grad_norm_d', 'grad_norm_g', 'learning_rate_g'):
    assert all(np.isfinite(v) for v in logged(straight, key).values()), key
  images, labels = generate.sample_and_save(tiny_ddgan_config(data_dir, **RUN), straight)
  assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8
  assert labels.shape == (16,) and set(labels) <= set(range(10))  # class-conditional, as digits_ddgan.py
  assert len(np.unique(images.reshape(16, -1), axis=0)) == 16  # every sample its own z and noise


def test_resume_after_a_crash_is_bitwise_identical(straight, data_dir, tmp_path):
  # What a SIGKILL between checkpoints 4 and 6 leaves: checkpoint 4 and the metrics of steps past it.
  train.train_and_evaluate(tiny_ddgan_config(data_dir, **{**RUN, 'train.num_steps': 5}), str(tmp_path))
  shutil.rmtree(tmp_path / 'checkpoints' / '5')
  train.train_and_evaluate(tiny_ddgan_config(data_dir, **RUN), str(tmp_path))
  assert_same_state(tmp_path, straight, data_dir)
  assert logged(tmp_path, 'loss_g')[STEPS] == logged(straight, 'loss_g')[STEPS]


def test_nan_guard_lock_and_corrupt_checkpoint(straight, data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  shutil.copytree(straight, workdir)
  with workdir_lib.lock(str(workdir)):  # the lock: a second run in the same workdir is refused
    with pytest.raises(WorkdirError, match='is in use by another training run'):
      train.train_and_evaluate(tiny_ddgan_config(data_dir, **RUN), str(workdir))

  # The newest checkpoint garbled: moved aside, training resumes from 6 and ends where the straight run did.
  largest = max((os.path.join(root, name) for root, _, names in os.walk(workdir / 'checkpoints' / '8')
                 for name in names), key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.seek(os.path.getsize(largest) // 2)
    garbled = bytes(b ^ 0xFF for b in f.read(8))
    f.seek(os.path.getsize(largest) // 2)
    f.write(garbled)
  train.train_and_evaluate(tiny_ddgan_config(data_dir, **RUN), str(workdir))
  assert os.listdir(workdir / 'checkpoints.corrupt')[0].startswith('8')
  assert_same_state(workdir, straight, data_dir)

  # A NaN batch at step 11: the guard names the discriminator's loss and keeps checkpoint 10.
  create_dataset = data.create_dataset

  def with_nan_batch(config, *, start_step=0, **kwargs):
    for step, batch in enumerate(create_dataset(config, start_step=start_step, **kwargs), start_step + 1):
      yield {**batch, 'image': np.full_like(batch['image'], np.nan)} if step == 11 else batch

  monkeypatch.setattr(data, 'create_dataset', with_nan_batch)
  with pytest.raises(FloatingPointError, match=r'non-finite loss_d \(nan\) at step 11; stopped without saving: '
                                               r'the last good checkpoint \(step 10\) is kept'):
    train.train_and_evaluate(tiny_ddgan_config(data_dir, **{**RUN, 'train.num_steps': 12}), str(workdir))


def test_sigterm_on_8_devices_saves_exits_143_and_continues_on_1(straight, data_dir, tmp_path):
  """What is computed before any update (step 1's discriminator losses, logits, gradient norm) is the same on 8
  devices as on 1 up to float reassociation. After it the runs drift apart further, as any GAN does: Adam's first
  steps normalise near-zero gradient components (the discriminator's last convolution starts at 1e-10), so a
  reassociation-level difference in one becomes an O(lr) difference in the parameter, and the game carries it on;
  so the later steps are compared loosely."""
  args = main_args(tmp_path, data_dir, ddgan=True, **RUN)
  result = subprocess.run([sys.executable, '-m', 'tests.faults', 'sigterm_at_step', '6', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, XLA_FLAGS=xla_flags(8)))
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
  saved = checkpoint.create_manager(str(tmp_path), read_only=True).latest_step()
  assert f'ddjax: preempted (SIGTERM) at step {saved}: saved checkpoint {saved}' in result.stderr
  assert '8 devices' in result.stdout
  for key in ('loss_d', 'd_real', 'd_fake', 'd_real_spread', 'grad_norm_d'):
    assert logged(tmp_path, key)[1] == pytest.approx(logged(straight, key)[1], rel=1e-5, abs=1e-9), key
  for key, tolerance in (('loss_d', 1e-3), ('loss_g', 2e-2)):
    on_8, on_1 = logged(tmp_path, key), logged(straight, key)
    assert all(abs(on_8[step] - on_1[step]) < tolerance for step in range(1, saved + 1)), key
  state = train.train_and_evaluate(tiny_ddgan_config(data_dir, **RUN), str(tmp_path))  # one device from here
  assert int(state.step) == STEPS
  assert sorted(logged(tmp_path, 'loss_g'))[-1] == STEPS and np.isfinite(logged(tmp_path, 'loss_g')[STEPS])


def test_two_processes_train_as_one_device_does(data_dir, tmp_path):
  """Two jax.distributed processes with 2 devices each, each reading one of 2 data shards, against one device
  reading both (the same global batches): what step 1 computes before any update matches up to float
  reassociation (the same examples, keys and parameters); every step is logged once (by process 0) and finite;
  the checkpoint the processes wrote together restores. Later steps are not compared: after the first updates a
  GAN's runs part (see above): by up to 0.09 in loss_g within 8 steps here. (Sampling on several processes is
  tested with diffusion, tests/test_parallel.py: the same generate_images.)"""
  run = {**RUN, 'train.num_steps': 4, 'data.num_shards': 2}
  train.train_and_evaluate(tiny_ddgan_config(data_dir, **{**run, 'train.num_steps': 1}), str(tmp_path / 'one'))
  result = run_processes(2, 2, tmp_path / 'two', data_dir, ddgan=True, **run)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '4 devices (cpu, shard_map)' in result.stdout
  for key in ('loss_d', 'd_real', 'd_fake', 'd_real_spread', 'grad_norm_d', 'r1'):
    assert logged(tmp_path / 'two', key)[1] == pytest.approx(logged(tmp_path / 'one', key)[1], rel=1e-5, abs=1e-9), key
  for key in ('loss_d', 'loss_g'):
    on_4 = logged(tmp_path / 'two', key)
    assert sorted(on_4) == [1, 2, 3, 4] and all(np.isfinite(list(on_4.values()))), key
  assert len(open(tmp_path / 'two' / 'metrics.jsonl').readlines()) == 4
  assert int(restore_state(tmp_path / 'two', tiny_ddgan_config(data_dir, **run)).step) == 4


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('settings, key', [
    ({'gan.num_timesteps': 0}, 'gan.num_timesteps'),
    ({'gan.num_timesteps': 9}, 'gan.num_timesteps'),
    ({'gan.lazy_reg': 0}, 'gan.lazy_reg'),
    ({'gan.nz': 0}, 'gan.nz'),
    ({'gan.r1_gamma': -0.1}, 'gan.r1_gamma'),
    ({'gan.t_emb_dim': 2}, 'gan.t_emb_dim'),
    ({'gan.t_emb_dim': 63}, 'gan.t_emb_dim'),
    ({'model.ch_mult': (1, 2, 2, 2, 2)}, 'data.image_size'),  # 8 px cannot halve four times
    ({'gan.discriminator': 'huge'}, 'gan.discriminator'),
    ({'model.name': 'unet'}, 'model.name'),
    ({'train.grad_accum_steps': 2}, 'train.grad_accum_steps'),
    ({'data.batch_size': 6}, 'data.batch_size'),  # 6 on one device: not whole minibatch-stddev groups of 4
])
def test_invalid_ddgan_setting_is_one_line(settings, key):
  with pytest.raises(ConfigError) as error:
    config_lib.validate(tiny_ddgan_config(None, **settings))
  message = str(error.value)
  assert message.startswith(f'{key}=') and '\n' not in message, message
