"""Each XLA:CPU kernel (ddjax/models/xla_cpu.py) equals the plain formulation that runs on every other platform, in
value and in the gradients of its inputs and parameters, in float32 and bfloat16; a tiny U-Net is the same network
under either, parameter tree included; the selection picks the kernel for the CPU only."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ddjax.models import conv, normalization, unet, xla_cpu

NHWC = ('NHWC', 'HWIO', 'NHWC')
# float32: the formulations sum in other orders. bfloat16 (8 significant bits): each formulation rounds each
# result to bfloat16 once, or (upsampled_conv's phase kernels, the weight gradients summed over its phases) twice,
# so they may differ by two units in the last place of the largest entry, 2⁻⁶ of it.
TOLERANCES = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2 ** -7, atol=2 ** -6)}


def random(shape, dtype=jnp.float32, *, seed, mean=0.0, std=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(mean, std, shape), dtype)


def value_and_grads(fn, args, cotangent):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(cotangent.astype(out.dtype))


def assert_same(kernel, plain, args, cotangent, dtype):
  """kernel(*args) and plain(*args) agree, and so do their gradients of every argument: within the dtype's
  tolerance, `atol` relative to each array's largest entry."""
  got, want = (jax.jit(functools.partial(value_and_grads, fn))(args, cotangent) for fn in (kernel, plain))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    b = np.asarray(b, np.float32)
    tolerance = TOLERANCES[dtype]
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tolerance['rtol'],
                               atol=tolerance['atol'] * np.abs(b).max())


DTYPES = [jnp.float32, jnp.bfloat16]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('silu, offset_shape, per_example_affine', [
    (False, None, False), (True, None, False), (True, (3, 32), False), (True, (32,), True)])
def test_group_norm(dtype, silu, offset_shape, per_example_affine):
  """normalization.GroupNorm's math (x and the offset in `dtype`, the norm in float32, the result in `dtype`);
  a per-example affine is NCSN++'s AdaGN."""
  affine_shape = (3, 32) if per_example_affine else (32,)
  args = [random((3, 4, 4, 32), dtype, seed=0, mean=1.0, std=2.0), random(affine_shape, seed=1, mean=1.0),
          random(affine_shape, seed=2)]
  if offset_shape:
    args.append(random(offset_shape, dtype, seed=3, std=3.0))

  def norm(implementation):
    return lambda x, s, b, o=None: implementation(x.astype(jnp.float32), s, b, o, num_groups=8,
                                                  epsilon=normalization.EPSILON, silu=silu).astype(dtype)

  assert_same(norm(xla_cpu.group_norm), norm(normalization.plain_group_norm), args,
              random((3, 4, 4, 32), seed=4), dtype)


@pytest.mark.parametrize('dtype', DTYPES)
def test_conv_and_bias_folded_into_the_norm(dtype):
  """The residual blocks' GN(conv(x) + bias + cond) → SiLU: on XLA:CPU the canonical-gradient convolution, its
  bias and the conditioning added as the norm's offset; plain, lax's convolution, then the bias and cond added."""
  args = [random((2, 4, 4, 16), dtype, seed=0), random((3, 3, 16, 16), dtype, seed=1, std=0.3),
          random((16,), dtype, seed=2), random((2, 16), dtype, seed=3), random((16,), seed=4, mean=1.0),
          random((16,), seed=5)]
  norm = dict(num_groups=4, epsilon=normalization.EPSILON, silu=True)

  def cpu(x, w, bias, cond, scale, shift):
    h = xla_cpu.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
    return xla_cpu.group_norm(h.astype(jnp.float32), scale, shift, bias + cond, **norm).astype(dtype)

  def plain(x, w, bias, cond, scale, shift):
    h = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC) + bias + cond[:, None, None]
    return normalization.plain_group_norm(h.astype(jnp.float32), scale, shift, **norm).astype(dtype)

  assert_same(cpu, plain, args, random((2, 4, 4, 16), seed=6), dtype)


@pytest.mark.parametrize('dtype', DTYPES)
def test_upsampled_conv(dtype):
  """Nearest 2× upsampling and a 3×3 SAME convolution, on a non-square image: four 2×2 phase convolutions of
  the image itself against the convolution of the upsampled image."""
  args = [random((2, 5, 7, 6), dtype, seed=0), random((3, 3, 6, 4), dtype, seed=1, std=0.3)]
  implementation = lambda fn: lambda x, w: fn(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
  assert_same(implementation(xla_cpu.upsampled_conv), implementation(conv.plain_upsampled_conv), args,
              random((2, 10, 14, 4), seed=2), dtype)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kernel, strides, padding', [
    ((3, 3), (1, 1), ((0, 0), (0, 0))), ((1, 3), (1, 1), ((0, 0), (0, 0))), ((3, 3), (2, 2), ((0, 0), (0, 0))),
    ((5, 5), (1, 1), ((2, 2), (2, 2)))])
def test_inception_conv(dtype, kernel, strides, padding):
  """The Inception network's convolutions: the unpadded stride-1 axes computed padded by a halo and cropped."""
  args = [random((2, 9, 9, 3), dtype, seed=0), random((*kernel, 3, 5), dtype, seed=1, std=0.3)]
  implementation = lambda fn: lambda x, w: fn(x, w, strides, padding, dimension_numbers=NHWC)
  cotangent_shape = jax.eval_shape(implementation(lax.conv_general_dilated), *args).shape
  assert_same(implementation(xla_cpu.halo_conv), implementation(lax.conv_general_dilated), args,
              random(cotangent_shape, seed=2), dtype)


TINY_UNET = dict(ch=16, ch_mult=1, num_levels=2, blocks=('res',), attn_resolution=2, num_heads=2, dropout=0.0,
                 t_dim=32, c_dim=32, num_classes=10, out_channels=2)


def test_tiny_unet_is_the_same_network_under_both_formulations(monkeypatch):
  """A two-level U-Net of residual blocks (every kernel: the offset GroupNorms, ConvAndBias, the upsampled
  convolution) has one parameter tree, and the same output and parameter gradients, with the XLA:CPU kernels
  and with the plain formulation (forced by DDJAX_FORMULATION)."""
  model = unet.UNet(**TINY_UNET)
  x, t, labels = random((2, 8, 8, 1), seed=0), jnp.array([3, 700]), jnp.array([2, 10])
  weights = random((2, 8, 8, 2), seed=1)
  results = {}
  for formulation in xla_cpu.FORMULATIONS:
    monkeypatch.setenv(xla_cpu.FORMULATION_VARIABLE, formulation)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)
    if 'params' not in results:  # jittered so that no residual branch starts at zero
      params = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x, t, labels)['params']
      results['params'] = jax.tree.map(lambda p: p + 0.1 * random(p.shape, seed=p.size), params)
    assert jax.tree.map(jnp.shape, shapes['params']) == jax.tree.map(jnp.shape, results['params'])

    def loss(params):
      out = model.apply({'params': params}, x, t, labels)
      return jnp.sum(out * weights), out

    results[formulation] = jax.jit(jax.value_and_grad(loss, has_aux=True))(results['params'])
  (_, out_cpu), grads_cpu = results['xla_cpu']
  (_, out_plain), grads_plain = results['plain']
  assert np.abs(out_plain).max() > 0.1
  # float32 rounding of the two summation orders, carried through the network; gradients against the largest
  # of all, as some are zero but for rounding (a bias that a GroupNorm's centring removes).
  np.testing.assert_allclose(out_cpu, out_plain, rtol=1e-4, atol=1e-4 * np.abs(out_plain).max())
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads_plain))
  for got, want in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_selection_follows_the_platform_of_the_lowering():
  """One program, lowered for the CPU and for a GPU: the CPU's holds xla_cpu.group_norm's backward (its
  optimisation barriers), the GPU's the plain formulation, differentiated by autodiff."""
  def grads(x, scale, bias):
    return jax.grad(lambda *a: jnp.sum(normalization.group_norm(*a, 4, normalization.EPSILON, silu=True)),
                    (0, 1, 2))(x, scale, bias)

  args = (jnp.ones((2, 4, 4, 8)), jnp.ones(8), jnp.zeros(8))
  text = {platform: jax.export.export(jax.jit(grads), platforms=[platform])(*args).mlir_module()
          for platform in ('cpu', 'cuda')}
  assert 'optimization_barrier' in text['cpu']
  assert 'optimization_barrier' not in text['cuda']


@pytest.mark.xla_cpu
@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's compiled program")
def test_cpu_program_keeps_no_conditional():
  """lax.platform_dependent's choice leaves no conditional in the CPU program (XLA:CPU's layout pass would not
  reach into one): its convolutions, a weight gradient included, are all canonical."""
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                                          dimension_numbers=NHWC))), (0, 1))
  text = jax.jit(grads).lower(x, w).compile().as_text()
  assert ' conditional(' not in text
  assert set(re.findall(r'dim_labels=([\w>-]+)', text)) == {'b01f_01io->b01f'}


def test_unknown_formulation_raises(monkeypatch):
  monkeypatch.setenv(xla_cpu.FORMULATION_VARIABLE, 'cudnn')
  with pytest.raises(ValueError, match=r"DDJAX_FORMULATION='cudnn' is invalid; allowed: xla_cpu, plain or unset"):
    normalization.group_norm(jnp.ones((1, 2, 2, 4)), jnp.ones(4), jnp.zeros(4), 2, normalization.EPSILON)
