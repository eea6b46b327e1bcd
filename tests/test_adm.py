"""The ADM U-Net (models/adm.py): the four published configs have the reference code's parameter counts, bad
settings stop with one line, remat and bfloat16 compute the same network."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import config as config_lib, models
from ddjax.config import load_config_module
from ddjax.validation import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
# The reference networks instantiated with the published flags (improved-diffusion 1bc7bbb, guided-diffusion
# 22e0df8, diffusers 0.42.1 with google/ddpm-cifar10-32's config), their parameters counted with torch.
REFERENCE_COUNTS = {'cifar10_ddpm': 35_746_307, 'cifar10_iddpm': 52_546_438, 'imagenet64_iddpm': 121_063_942,
                    'imagenet64_adm': 295_904_454}


def load_config(name):
  return load_config_module(CONFIGS / f'{name}.py').get_config()


def abstract_inputs(config, batch=2):
  size, channels = config.data.image_size, config.data.num_channels
  x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return x, t, (t if config.data.num_classes else None)


@pytest.mark.parametrize('name', REFERENCE_COUNTS)
def test_published_configs_have_the_reference_parameter_count(name):
  config = load_config(name)
  config_lib.validate(config, device_count=8)
  model = models.create_model(config)
  x, t, labels = abstract_inputs(config)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)['params']
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == REFERENCE_COUNTS[name]
  out = jax.eval_shape(model.apply, {'params': params}, x, t, labels)
  assert out.shape == x.shape[:3] + (2 * 3 if config.diffusion.variance == 'learned_range' else 3,)


def tiny_config(**model_keys):
  """8×8 digits, class-conditional with label dropout (so a null class), two levels of 32 and 64 channels."""
  config = load_module_adm().get_config(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                                                  num_heads=2, scale_shift_norm=True), **model_keys})
  return config


def load_module_adm():
  return load_config_module(CONFIGS / '_adm.py')


@pytest.mark.parametrize('key, value, message', [
    ('data.image_size', 7, 'data.image_size=7 is invalid; allowed: a multiple of 2**(len(model.ch_mult)-1) = 2'),
    ('model.attn_resolutions', (2,), 'model.attn_resolutions=(2,) is invalid; allowed: a tuple of feature-map widths '
     'of this network: (8, 4)'),
    ('model.num_heads', 3, 'model.num_heads=3 is invalid; allowed: a divisor of every attention width [64]'),
    ('model.num_head_channels', 48, 'model.num_head_channels=48 is invalid; allowed: -1 or a divisor'),
    ('model.ch', 16, 'model.ch=16 is invalid; allowed: a width whose every level'),
    ('model.layout', 'tf', "model.layout='tf' is invalid; allowed: 'adm', 'ddpm'"),
    ('model.attention_order', 'old', "model.attention_order='old' is invalid; allowed: 'legacy', 'new'"),
    ('model.ch_mult', (1, 0), 'model.ch_mult=(1, 0) is invalid; allowed: a non-empty tuple of ints >= 1'),
])
def test_invalid_setting_is_one_config_error_line(key, value, message):
  config = tiny_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(config, device_count=1)
  assert str(error.value).startswith(message) and '\n' not in str(error.value), str(error.value)


def test_guidance_without_a_null_class_is_one_line():
  """A class-conditional network trained without label dropout (imagenet64_adm) has no null class to guide with."""
  config = load_config('imagenet64_adm')
  config.sample.guidance = 1.0
  with pytest.raises(ConfigError, match=r'^sample.guidance=1.0 is invalid; allowed: 0 unless train.p_uncond > 0'):
    config_lib.validate(config, device_count=8)
  params = jax.eval_shape(models.create_model(config).init, jax.random.key(0), *abstract_inputs(config))['params']
  assert params['label_emb']['embedding'].shape == (1000, 768)
  config.train.p_uncond = 0.1  # label dropout trains the null class: one more row
  params = jax.eval_shape(models.create_model(config).init, jax.random.key(0), *abstract_inputs(config))['params']
  assert params['label_emb']['embedding'].shape == (1001, 768)


def random_params(model, config, seed=0):
  """Every parameter random (zero-initialised ones included), so each path of the network shows in the output."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), *abstract_inputs(config))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), jnp.float32), abstract)


def test_remat_and_bfloat16_compute_the_same_network():
  config = tiny_config(resblock_updown=True, attention_order='new', dropout=0.1)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  t, labels = jnp.array([3, 900]), jnp.array([0, 10])  # 10: the null class
  model = models.create_model(config)
  params = random_params(model, config)

  def loss(params, model):
    out = model.apply({'params': params}, x, t, labels, train=True, rngs={'dropout': jax.random.key(2)})
    return jnp.mean(jnp.square(out)), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, model)
  config.model.remat = True
  (value_remat, out_remat), grads_remat = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      params, models.create_model(config))
  np.testing.assert_allclose(out_remat, out, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(out))))
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * largest), grads_remat, grads)

  config.model.remat, config.parallel.precision = False, 'bfloat16'
  bf16 = models.create_model(config)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(random_params(bf16, config)))
  out_bf16 = jax.jit(lambda p: bf16.apply({'params': p}, x, t, labels))(params)
  out_f32 = jax.jit(lambda p: model.apply({'params': p}, x, t, labels))(params)
  assert out_bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out_bf16 - out_f32))) < 0.05 * float(jnp.max(jnp.abs(out_f32)))
  assert float(jnp.max(jnp.abs(out_f32))) > 0
