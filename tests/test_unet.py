"""The seed U-Net: the five ImageNet-64 configs build with the right shapes; a tiny one runs and conditions."""
import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax import models
from ddjax.config import load_config_module
from ddjax.models import normalization, unet

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
IMAGENET64 = ['res_conv', 'res', 'res_res', 'res_res_atn', 'res_large']


def load_config(name):
  return load_config_module(CONFIGS / f'{name}.py').get_config()


def count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize('variant', IMAGENET64)
def test_imagenet64_configs_build(variant):
  config = load_config(f'imagenet64_{variant}')
  model = models.create_model(config)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  t = labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)['params']
  out = jax.eval_shape(model.apply, {'params': params}, x, t, labels)
  assert out.shape == (2, 64, 64, 6) and out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  print(f'imagenet64_{variant}: {count(params):,} parameters')
  assert 1e7 < count(params) < 3e8


def tiny_config(**model_overrides):
  config = load_config('digits')
  config.model.update({**dict(ch=16, num_levels=2, blocks='res,conv,clsAtn,atn,chnAtn', attn_resolution=2,
                              num_heads=2, t_dim=32, c_dim=32), **model_overrides})
  return config


def init_params(model, config):
  """Real init, then jitter every param: zero-initialised residual branches make a fresh net output 0.

  The 'rbg' key only makes the CPU compile of init ~3x faster than threefry; the network does not care.
  """
  size, channels = config.data.image_size, config.data.num_channels
  x = jnp.zeros((2, size, size, channels))
  labels = jnp.zeros((2,), jnp.int32) if config.data.num_classes else None
  params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x, jnp.zeros((2,), jnp.int32), labels)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params['params'])


@pytest.fixture(scope='module')
def tiny():
  """Every token, class-conditional, learned_range, dropout 0.1: (jitted apply, x, params)."""
  config = tiny_config(dropout=0.1)
  model = models.create_model(config)
  params = init_params(model, config)
  apply = jax.jit(lambda x, t, labels, train, key: model.apply(
      {'params': params}, x, t, labels, train=train, rngs={'dropout': key}), static_argnames='train')
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  return apply, x, params


def test_tiny_runs(tiny):
  apply, x, _ = tiny
  out = apply(x, jnp.array([5, 900]), jnp.array([3, 10]), False, jax.random.key(0))
  assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32  # learned_range: 2 x 1 channel
  assert np.isfinite(out).all()


def test_tiny_conditions_on_labels_and_t(tiny):
  apply, x, _ = tiny
  key = jax.random.key(0)
  t = jnp.array([100, 100])
  base = apply(x, t, jnp.array([3, 3]), False, key)
  null = apply(x, t, jnp.array([10, 10]), False, key)  # index num_classes = the null class
  later = apply(x, jnp.array([700, 700]), jnp.array([3, 3]), False, key)
  assert np.abs(base - null).max() > 1e-3
  assert np.abs(base - later).max() > 1e-3


def test_tiny_dropout_only_in_training(tiny):
  apply, x, _ = tiny
  t, labels = jnp.array([100, 100]), jnp.array([3, 3])
  key_a, key_b = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(apply(x, t, labels, False, key_a), apply(x, t, labels, False, key_b))
  assert np.abs(apply(x, t, labels, True, key_a) - apply(x, t, labels, True, key_b)).max() > 1e-3


def test_unconditional_bfloat16_fixed_variance():
  """num_classes 0 (labels None), C output channels, bf16 compute with f32 params and output, dropout 0."""
  config = tiny_config(blocks='res,clsAtn', dropout=0.0)
  config.data.num_classes = 0
  config.diffusion.variance = 'fixed_small'
  config.parallel.precision = 'bfloat16'
  model = models.create_model(config)
  params = init_params(model, config)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  apply = jax.jit(lambda key: model.apply({'params': params}, jnp.ones((2, 8, 8, 1)), jnp.array([1, 2]),
                                          None, train=True, rngs={'dropout': key}))
  out = apply(jax.random.key(1))
  assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, apply(jax.random.key(2)))  # dropout 0: no randomness in training


def test_helpers():
  assert [unet.eca_kernel_size(c) for c in (16, 64, 128, 256, 512)] == [3, 3, 5, 5, 5]
  assert [unet.largest_divisor(c, 32) for c in (16, 48, 128, 192, 24)] == [16, 24, 32, 32, 24]
  emb = unet.timestep_embedding(jnp.array([0, 10]), 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])


def assert_close_with_gradients(ours, reference, cotangent, tolerance):
  """ours and reference are jax.vjp's (output, vjp function) pairs: the values and every input's gradient agree
  within tolerance, relative to each array's largest entry."""
  (out, ours_vjp), (expected, reference_vjp) = ours, reference
  got_grads, want_grads = ours_vjp(cotangent.astype(out.dtype)), reference_vjp(cotangent.astype(expected.dtype))
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for got, want in zip([out, *jax.tree.leaves(got_grads)], [expected, *jax.tree.leaves(want_grads)]):
    want = np.asarray(want, np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tolerance * np.abs(want).max())


@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 3e-6), (jnp.bfloat16, 8e-3)])
@pytest.mark.parametrize('silu', [False, True])
def test_group_norm_is_flax_group_norm(dtype, tolerance, silu):
  """normalization.GroupNorm (xla_cpu.group_norm in a CPU program, with `silu` the activation fused in) has
  nn.GroupNorm's parameters, and its results and gradients (of the input, scale and bias), followed by nn.silu
  with `silu`: in bfloat16 to bfloat16's precision of float32's."""
  x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, (3, 8, 8, 96)), dtype)
  params = {'scale': jnp.linspace(0.5, 2, 96), 'bias': jnp.linspace(-1, 1, 96)}
  ours = normalization.GroupNorm(num_groups=32, dtype=dtype, silu=silu)
  flax_norm = nn.GroupNorm(num_groups=32)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, flax_norm.init(jax.random.key(0), x)))
  activation = nn.silu if silu else (lambda y: y)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), dtype)
  out, ours_vjp = jax.vjp(lambda p, x: ours.apply({'params': p}, x), params, x)
  assert out.dtype == dtype
  assert_close_with_gradients(
      (out, ours_vjp),
      jax.vjp(lambda p, x: activation(flax_norm.apply({'params': p}, x)), params, x.astype(jnp.float32)),
      cotangent, tolerance)


def test_group_norm_with_a_per_example_affine_is_adagn():
  """group_norm with [B, C] scale and bias, SiLU fused (NCSN++'s AdaGN): silu(γ·GN(x) + β) of nn.GroupNorm
  without affine, in value and in the gradients of x, γ and β (per example)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 2.0, (3, 8, 8, 96)), jnp.float32)
  gamma, beta = (jnp.asarray(rng.normal(m, 0.5, (3, 96)), jnp.float32) for m in (1.0, 0.0))
  flax_norm = nn.GroupNorm(num_groups=24, use_scale=False, use_bias=False)

  def adagn(x, gamma, beta):
    return nn.silu(gamma[:, None, None] * flax_norm.apply({}, x) + beta[:, None, None])

  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  assert_close_with_gradients(
      jax.vjp(lambda x, g, b: normalization.group_norm(x, g, b, 24, 1e-6, True), x, gamma, beta),
      jax.vjp(adagn, x, gamma, beta), cotangent, 3e-6)


def compiled_entry(program, *args) -> list[tuple[str, str, set]]:
  """(name, shape, operands' shapes) of each instruction of the compiled program's entry computation."""
  text = program.lower(*args).compile().as_text()
  entry = re.findall(r'^\s*(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])\S* (.*)$', text[text.index('ENTRY'):], re.MULTILINE)
  shapes = {name: shape for name, shape, _ in entry}
  return [(name, shape, {shapes.get(operand) for operand in re.findall(r'%([\w.\-]+)', rest)})
          for name, shape, rest in entry]


def activation_readers(program, x, *args) -> int:
  """How many instructions of the compiled program(x, *args) read an array of x's shape."""
  activation = f'f32[{",".join(map(str, x.shape))}]'
  return sum(activation in operands for _, _, operands in compiled_entry(program, x, *args))


on_xla_cpu = pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's compiled program")


@pytest.mark.xla_cpu
@on_xla_cpu
@pytest.mark.parametrize('per_example_affine', [False, True])
@pytest.mark.parametrize('offset_shape', [(3, 96), (96,)])
def test_group_norm_offset_is_the_norm_of_the_shifted_input(per_example_affine, offset_shape):
  """group_norm(x, ..., offset=o) is the norm of x + o (o per example and channel, or per channel), SiLU fused,
  in value and in the gradients of x, scale, bias and o; on XLA:CPU formed within the norm's own passes, so the
  offset costs no instruction that reads an activation-sized array."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 2.0, (3, 8, 8, 96)), jnp.float32)
  affine_shape = (3, 96) if per_example_affine else (96,)
  scale, bias = (jnp.asarray(rng.normal(m, 0.5, affine_shape), jnp.float32) for m in (1.0, 0.0))
  offset = jnp.asarray(rng.normal(0.5, 3.0, offset_shape), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  norm = functools.partial(normalization.group_norm, num_groups=24, epsilon=1e-6, silu=True)
  shifted = lambda x, s, b, o: norm(x + o.reshape(-1 if o.ndim == 2 else 1, 1, 1, 96), s, b)
  assert_close_with_gradients(jax.vjp(lambda x, s, b, o: norm(x, s, b, offset=o), x, scale, bias, offset),
                              jax.vjp(shifted, x, scale, bias, offset), cotangent, 3e-6)
  with_gradients = lambda offset: jax.jit(lambda x, s, b, g, *o: jax.vjp(
      lambda x, s, b, *o: norm(x, s, b, offset=o[0] if o else None), x, s, b, *o)[1](g))
  assert (activation_readers(with_gradients(offset), x, scale, bias, cotangent, offset)
          == activation_readers(with_gradients(None), x, scale, bias, cotangent))


def test_res_block_is_its_flax_composition():
  """The U-Net's ResBlock, whose first convolution's bias and conditioning are added within the second
  GroupNorm, computes GN → SiLU → conv + bias + Dense(SiLU(t)) + Dense(SiLU(c)) → GN → SiLU → conv, plus x, of
  Flax's own layers on its parameters: in value and in the gradients of every parameter and of x."""
  rng = np.random.default_rng(0)
  x, t_emb, c_emb = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 8, 8, 64), (2, 32), (2, 16)))
  block = unet.ResBlock(dropout=0.0)
  params = block.init(jax.random.key(0), x, t_emb, c_emb, False)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)  # no zeros

  def flax_block(params, x):
    p = params['params']
    norm = lambda name, h: nn.silu(nn.GroupNorm(num_groups=32).apply({'params': p[name]}, h))
    conv = lambda name, h: nn.Conv(64, (3, 3)).apply({'params': p[name]}, h)
    dense = lambda name, e: nn.Dense(64).apply({'params': p[name]}, nn.silu(e))
    h = conv('Conv_0', norm('GroupNorm_0', x)) + (dense('Dense_0', t_emb) + dense('Dense_1', c_emb))[:, None, None]
    return x + conv('Conv_1', norm('GroupNorm_1', h))

  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  assert_close_with_gradients(jax.vjp(lambda p, x: block.apply(p, x, t_emb, c_emb, False), params, x),
                              jax.vjp(flax_block, params, x), cotangent, 3e-6)


@pytest.mark.xla_cpu
@on_xla_cpu
def test_group_norm_gradient_sums_the_batch_from_its_per_example_sums():
  """The scale's and bias's gradients (shape [C]) are reduced from the [B, C] per-example sums, not by another pass
  over an activation-sized array: no [C]-shaped instruction of the compiled backward reads a [B, H, W, C] one."""
  x = jnp.ones((2, 8, 8, 16))
  grads = jax.jit(lambda x, s, b, g: jax.vjp(lambda x, s, b: normalization.group_norm(x, s, b, 4, 1e-6, True),
                                             x, s, b)[1](g))
  readers = [(name, operands) for name, shape, operands in compiled_entry(grads, x, jnp.ones(16), jnp.zeros(16), x)
             if shape == 'f32[16]']
  assert readers  # the two [C] gradients
  for name, operands in readers:
    assert 'f32[2,8,8,16]' not in operands, name


@pytest.mark.parametrize('key, value, match', [
    ('blocks', 'res,foo', r"model\.blocks='res,foo' is invalid; allowed: a comma list of res, conv, clsAtn, "
                          r"atn, chnAtn \(unknown block 'foo'\)"),
    ('num_levels', 0, r'model\.num_levels=0'),
    ('num_heads', 3, r'model\.num_heads=3 .* divisor of model\.ch=16'),
    ('name', 'foo', r"model\.name='foo' is invalid; allowed: 'unet', 'adm', 'ncsnpp'"),
    ('ch_mult', -1, r'model\.ch_mult=-1'),
])
def test_bad_model_config_raises(key, value, match):
  config = tiny_config()
  config.model[key] = value
  with pytest.raises(ValueError, match=match):
    models.create_model(config)


def param_shapes(config):
  model = models.create_model(config)
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  return jax.tree.map(lambda p: p.shape, jax.eval_shape(model.init, jax.random.key(0), x, t, t)['params'])


def tuple_config(ch_mult):
  config = tiny_config(num_levels=3, blocks='res,clsAtn')
  del config.model['ch_mult']  # an int in digits.py
  config.model.ch_mult = ch_mult
  return config


def test_per_level_ch_mult():
  """A tuple ch_mult sets each level's width to ch·ch_mult[level] (DDPM's (1, 2, 2, 2) convention); the seed's
  doubling ch_mult=1 is the tuple (1, 2, 4), parameter for parameter."""
  assert param_shapes(tuple_config((1, 2, 4))) == param_shapes(tiny_config(num_levels=3, blocks='res,clsAtn'))
  shapes = param_shapes(tuple_config((2, 3, 3)))
  assert shapes['Conv_0']['kernel'] == (3, 3, 1, 32)  # the stem maps to level 0's width ch·2
  assert shapes['Conv_1']['kernel'] == (3, 3, 32, 48)  # downsampling into level 1: 16·3
  assert shapes['Conv_2']['kernel'] == (3, 3, 48, 48)  # level 2 as wide as level 1
  assert shapes['mid_0_res']['Conv_0']['kernel'] == (3, 3, 48, 48)
  assert count(jax.tree.map(np.zeros, shapes, is_leaf=lambda s: isinstance(s, tuple))) == 426_386  # pinned


@pytest.mark.parametrize('ch_mult, match', [
    ((1, 2), r'model\.ch_mult=\(1, 2\) is invalid; allowed: an int >= 0 .* or a tuple of model\.num_levels=3 '
             r'ints >= 1'),
    ((1, 0, 2), r'model\.ch_mult=\(1, 0, 2\)'),
])
def test_bad_per_level_ch_mult_raises(ch_mult, match):
  with pytest.raises(ValueError, match=match):
    models.create_model(tuple_config(ch_mult))


def test_image_size_not_divisible_raises():
  config = tiny_config(num_levels=3)
  config.data.image_size = 6
  with pytest.raises(ValueError, match=r'data\.image_size=6 is invalid; allowed: a multiple of .* = 4 with '
                                       r'model\.num_levels=3'):
    models.create_model(config)


def grad_fn(model):
  """(params, key, x, t, labels) -> ((mean(output²), output), its param grads), in training (dropout on)."""
  def loss(params, key, x, t, labels):
    out = model.apply({'params': params}, x, t, labels, train=True, rngs={'dropout': key})
    return jnp.mean(out ** 2), out
  return jax.value_and_grad(loss, has_aux=True)


def test_remat_same_params_outputs_and_grads_and_less_memory(tiny):
  """model.remat changes neither the parameter tree (checkpoints load across it) nor the numbers, and XLA's
  memory analysis of the grad step shows it keeping far fewer activations for the backward pass.

  XLA:CPU drops jax.checkpoint's optimisation barriers before a CSE pass that then undoes remat; XLA:GPU keeps
  them, and so do these compiles.
  """
  _, _, params = tiny
  plain, remat = (models.create_model(tiny_config(dropout=0.1, remat=flag)) for flag in (False, True))
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  t, labels = jnp.arange(16) * 60, jnp.arange(16) % 11
  shapes = [jax.eval_shape(m.init, jax.random.key(0), x, t, labels)['params'] for m in (plain, remat)]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
  assert jax.tree.map(lambda p: p.shape, shapes[0]) == jax.tree.map(lambda p: p.shape, shapes[1])
  arguments = (params, jax.random.key(7), x, t, labels)
  compiled = [jax.jit(grad_fn(m)).lower(*arguments).compile(
      compiler_options={'xla_disable_hlo_passes': 'cse_barrier_expander'}) for m in (plain, remat)]
  ((_, out_plain), grads_plain), ((_, out_remat), grads_remat) = (c(*arguments) for c in compiled)
  assert np.abs(out_plain).max() > 0.1  # jittered params: a non-trivial output, with dropout masks applied
  # Two programs (remat recomputes inside its own fusions): the same numbers to float32 rounding.
  np.testing.assert_allclose(out_remat, out_plain, rtol=1e-5, atol=1e-5)
  for g_remat, g_plain in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-6)
  temp = [c.memory_analysis().temp_size_in_bytes for c in compiled]
  print(f'temp bytes without / with remat: {temp[0]:,} / {temp[1]:,}')
  assert temp[1] < 0.5 * temp[0]
