"""The ADM U-Net (models/adm.py): the four published configs have the reference code's parameter counts, bad
settings stop with one line, remat and bfloat16 compute the same network."""
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ddjax import config as config_lib, models, pretrained
from ddjax.config import load_config_module
from ddjax.pretrained import adm as pretrained_adm
from ddjax.validation import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
# The reference networks instantiated with the published flags (improved-diffusion 1bc7bbb, guided-diffusion
# 22e0df8, diffusers 0.42.1 with google/ddpm-cifar10-32's config), their parameters counted with torch.
REFERENCE_COUNTS = {'cifar10_ddpm': 35_746_307, 'cifar10_iddpm': 52_546_438, 'imagenet64_iddpm': 121_063_942,
                    'imagenet64_adm': 295_904_454}
REFERENCE_RES_BLOCKS = {'cifar10_ddpm': 2, 'cifar10_iddpm': 3, 'imagenet64_iddpm': 3, 'imagenet64_adm': 3}


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


# ---- parity with the reference code (tests/fixtures/make_adm_fixtures.py) ----

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
# fixture: (weights file, ADM keys of the tiny network the reference built, T, classes, learned variance)
PARITY = {
    'improved_ssn_sigma': ('adm_improved_ssn_sigma.pt', dict(
        num_res_blocks=2, attn_resolutions=(4,), num_heads=2, scale_shift_norm=True, rescale_timesteps=True),
        4000, 0, True),
    'improved_plain_cond': ('adm_improved_plain_cond.pt', dict(
        attn_resolutions=(8, 4), num_heads=1, rescale_timesteps=True), 4000, 5, False),
    'guided_new_updown_cond': ('adm_guided_new_updown_cond.pt', dict(
        attn_resolutions=(8, 4), num_head_channels=16, scale_shift_norm=True, resblock_updown=True,
        attention_order='new'), 1000, 5, True),
    'guided_legacy_heads': ('adm_guided_legacy_heads.pt', dict(attn_resolutions=(4,), num_heads=4), 1000, 0, False),
    'diffusers_ddpm': ('adm_diffusers_ddpm/diffusion_pytorch_model.safetensors', dict(
        layout='ddpm', attn_resolutions=(4,)), 1000, 0, False),
}


def fixture_config(model_keys, steps, num_classes, learned):
  """The digits config at 8×8×3 with the fixture's network: ch 32, ch_mult (1, 1), one res block per level unless
  model_keys say otherwise; no label dropout, so no null class, as the reference networks."""
  config = load_module_adm().get_config(**{**dict(ch=32, ch_mult=(1, 1), num_res_blocks=1), **model_keys})
  config.data.update(image_size=8, num_channels=3, num_classes=num_classes)
  config.diffusion.update(num_timesteps=steps, variance='learned_range' if learned else 'fixed_small',
                          loss='hybrid' if learned else 'simple')
  config.train.p_uncond = 0.0
  config.sample.guidance = 0.0
  config.sweep.guidance = '0'
  return config


def reference_output(name):
  arrays = np.load(FIXTURES / f'adm_{name}.npz')
  return arrays['x'], arrays['t'], arrays['labels'] if 'labels' in arrays else None, arrays['out']


def network_output(config, params, x, t, labels):
  model = models.create_model(config)
  return np.asarray(model.apply({'params': params}, jnp.asarray(x), jnp.asarray(t, jnp.int32),
                                None if labels is None else jnp.asarray(labels, jnp.int32)))


@pytest.mark.parametrize('name', PARITY)
def test_imported_reference_network_gives_its_output(name):
  """max |Δ| <= 1e-4 · max |output| in float32 against the reference network run by its own code."""
  path, model_keys, steps, num_classes, learned = PARITY[name]
  config = fixture_config(model_keys, steps, num_classes, learned)
  config_lib.validate(config, device_count=1)
  params = pretrained.load_params(str(FIXTURES / path), config)
  x, t, labels, expected = reference_output(name)
  out = network_output(config, params, x, t, labels)
  error = float(np.max(np.abs(out - expected)))
  print(f'{name}: max |Δ| {error:.2e}, max |out| {np.max(np.abs(expected)):.3f}')
  assert error <= 1e-4 * float(np.max(np.abs(expected)))


def test_diffusers_file_with_the_old_attention_names_imports_the_same(tmp_path):
  """google/ddpm-cifar10-32 names its attention projections query/key/value/proj_attn (diffusers before 0.15)."""
  path, model_keys, steps, num_classes, learned = PARITY['diffusers_ddpm']
  state = safetensors.numpy.load_file(FIXTURES / path)
  old_names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  renamed = {re.sub(r'\.(to_q|to_k|to_v|to_out\.0)\.', lambda m: f'.{old_names[m[1]]}.', key): value
             for key, value in state.items()}
  assert any('.query.' in key for key in renamed)
  safetensors.numpy.save_file(renamed, tmp_path / 'old.safetensors')
  config = fixture_config(model_keys, steps, num_classes, learned)
  new, old = (pretrained.load_params(str(p), config) for p in (FIXTURES / path, tmp_path / 'old.safetensors'))
  jax.tree.map(np.testing.assert_array_equal, old, new)


@pytest.mark.parametrize('name, key, value, phrase', [
    ('improved_ssn_sigma', 'model.num_res_blocks', 1, 'the file has 2 res blocks per level; model.num_res_blocks=1'),
    ('improved_ssn_sigma', 'diffusion.variance', 'fixed_small', "the file has 6 output channels (a learned "
     "variance); diffusion.variance='fixed_small'"),
    ('guided_new_updown_cond', 'model.resblock_updown', False, 'the file has res blocks for resampling; '
     'model.resblock_updown=False'),
    ('guided_legacy_heads', 'model.attn_resolutions', (8, 4), 'the file has attention at widths (4,) (at 8 px); '
     'model.attn_resolutions=(8, 4)'),
    ('improved_plain_cond', 'train.p_uncond', 0.1, 'the file has 5 class embeddings; data.num_classes=5, '
     'train.p_uncond=0.1 (6 rows'),
    ('diffusers_ddpm', 'model.layout', 'adm', "the file has DDPM's network (diffusers' layout); model.layout='adm'"),
])
def test_a_file_that_does_not_fit_names_the_flag(name, key, value, phrase):
  path, model_keys, steps, num_classes, learned = PARITY[name]
  config = fixture_config(model_keys, steps, num_classes, learned)
  section, field = key.split('.')
  config[section][field] = value
  if key == 'diffusion.variance':
    config.diffusion.loss = 'simple'
  with pytest.raises(pretrained.PretrainedError) as error:
    pretrained.load_params(str(FIXTURES / path), config)
  message = str(error.value)
  assert phrase in message and '\n' not in message, message


@pytest.mark.parametrize('name', REFERENCE_COUNTS)
def test_published_checkpoint_keys_map_onto_its_config(name):
  """Every key of the released checkpoint's state_dict (its keys and shapes from the reference network built with
  the published flags) maps onto one parameter of the config's network with that parameter's shape, and its
  shapes reveal no differing flag; with one flag changed, the hint names it."""
  shapes = {key: tuple(shape) for key, shape in
            json.loads((FIXTURES / 'adm_published_shapes.json').read_text())[name].items()}
  config = load_config(name)
  converter = next(c for c in pretrained_adm.CONVERTERS if c.accepts(set(shapes), config))
  param_shapes = pretrained.param_shapes(config)
  key_map = converter.key_map(config, param_shapes)
  assert set(key_map) == set(param_shapes)
  assert sorted(key for key, _ in key_map.values()) == sorted(shapes)
  for path, (key, transform) in key_map.items():
    assert transform(np.broadcast_to(np.float32(0), shapes[key])).shape == param_shapes[path], (path, key)
  assert converter.hint(shapes, config) is None
  config.model.num_res_blocks = 2 if config.model.num_res_blocks == 3 else 3
  assert converter.hint(shapes, config).startswith(
      f'the file has {REFERENCE_RES_BLOCKS[name]} res blocks per level; model.num_res_blocks=')
