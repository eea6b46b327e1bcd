"""DDGAN networks: the paper's configs build with the reference's exact parameter counts; a tiny generator and
discriminator run and condition on z and t; FIR resampling and minibatch-stddev against closed forms."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddjax.models import conv, discriminator, ncsnpp, xla_cpu

# Reference counts: sum(p.numel() for p in model.parameters()) of NVlabs/denoising-diffusion-gan at commit
# 6818ded6443e10ab69c7864745457ce391d4d883 (torch 2.13.0 CPU, score_sde/op stubbed to its native CPU path; no
# op runs to count), built with train_ddgan.py's argument defaults plus the readme's training commands:
#   NCSNpp(args): cifar10 --num_channels_dae 128 --ch_mult 1 2 2 2 --n_mlp 4 --nz 100 --z_emb_dim 256;
#     celeba_256 and lsun --image_size 256 --num_channels_dae 64 --ch_mult 1 1 2 2 4 4 --z_emb_dim 256 (n_mlp
#     default 3, nz default 100: the two 256-px generators are the same network). The CIFAR-10 network built
#     with --image_size 64 has the same count (attention at 16 px lands on a level of the same width).
#   Discriminator_small / Discriminator_large(nc=2*3, ngf=64, t_emb_dim=256), as train_ddgan.py builds them.
REF_G_CIFAR10 = 48_432_515
REF_G_256 = 39_726_979
REF_D_SMALL = 12_741_633
REF_D_LARGE = 27_737_217

CIFAR10 = dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), nz=100, z_emb_dim=256,
               n_mlp=4)
G256 = dict(nf=64, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), nz=100, z_emb_dim=256,
            n_mlp=3)
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_channels=1, nz=8, z_emb_dim=16,
            n_mlp=2)


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def spec(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def generator_shapes(model, size, channels, batch=2, labels=None):
  """(params, output) as shapes only: nothing runs."""
  x, t, z = spec(batch, size, size, channels), spec(batch, dtype=jnp.int32), spec(batch, model.nz)
  params = jax.eval_shape(lambda k, *a: model.init(k, *a, train=False), jax.random.key(0), x, t, z, labels)
  out = jax.eval_shape(lambda p, *a: model.apply(p, *a, train=False), params, x, t, z, labels)
  return params, out


def discriminator_shapes(model, size, channels, batch=4):
  x, t = spec(batch, size, size, channels), spec(batch, dtype=jnp.int32)
  params = jax.eval_shape(lambda k, x, t: model.init(k, x, t, x, train=False), jax.random.key(0), x, t)
  out = jax.eval_shape(lambda p, x, t: model.apply(p, x, t, x, train=False), params, x, t)
  return params, out


@pytest.mark.parametrize('name, g_kwargs, size, variant, ref_g, ref_d', [
    ('cifar10', CIFAR10, 32, 'small', REF_G_CIFAR10, REF_D_SMALL),
    ('cifar10-net@64px', CIFAR10, 64, 'small', REF_G_CIFAR10, REF_D_SMALL),
    ('celebahq256', G256, 256, 'large', REF_G_256, REF_D_LARGE),
    ('lsun_church256', G256, 256, 'large', REF_G_256, REF_D_LARGE),
])
def test_paper_configs_match_reference(name, g_kwargs, size, variant, ref_g, ref_d):
  assert ncsnpp.num_resolutions_ok(size, g_kwargs['ch_mult']) and discriminator.check_fits(variant, size) is None
  g_params, x0 = generator_shapes(ncsnpp.NCSNpp(**g_kwargs), size, 3)
  assert x0.shape == (2, size, size, 3) and x0.dtype == jnp.float32
  d_params, logits = discriminator_shapes(discriminator.VARIANTS[variant](), size, 3)
  assert logits.shape == (4,) and logits.dtype == jnp.float32
  print(f'\n{name}: G {count(g_params):,} (reference {ref_g:,}), D {variant} {count(d_params):,} '
        f'(reference {ref_d:,})')
  assert count(g_params) == ref_g and count(d_params) == ref_d


def test_class_embedding_and_bf16_shapes():
  """num_classes adds Embed(num_classes, nz) and nz more input rows to the first mapping layer; bf16 compute
  keeps float32 params and output."""
  plain, _ = generator_shapes(ncsnpp.NCSNpp(**TINY), 8, 1)
  labels = spec(2, dtype=jnp.int32)
  conditional, out = generator_shapes(ncsnpp.NCSNpp(**TINY, num_classes=10, dtype=jnp.bfloat16), 8, 1,
                                      labels=labels)
  assert count(conditional) - count(plain) == 10 * 8 + 8 * 16
  assert out.dtype == jnp.float32 and all(p.dtype == jnp.float32 for p in jax.tree.leaves(conditional))
  with pytest.raises(ValueError, match='labels must be None'):
    generator_shapes(ncsnpp.NCSNpp(**TINY), 8, 1, labels=labels)
  # Without the input pyramid (one FIR+3x3 conv of 1 -> 16 channels) and without time conditioning (2 dense
  # layers nf -> 4nf -> 4nf, and one 4nf -> C dense in each of the 10 residual blocks).
  bare, out = generator_shapes(ncsnpp.NCSNpp(**TINY, progressive_input='none', conditional=False), 8, 1)
  per_block = sum(64 * c + c for c in (16, 16, 32, 32, 32, 32, 32, 32, 16, 16))  # each block's out_ch
  assert count(plain) - count(bare) == (9 * 16 + 16) + (16 * 64 + 64 + 64 * 64 + 64) + per_block
  assert out.shape == (2, 8, 8, 1)


def jitter(params, scale=0.1):
  """Near-zero residual and output convs make a fresh net nearly constant: perturb every param."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def test_tiny_generator_runs_and_conditions():
  model = ncsnpp.NCSNpp(**TINY)  # 208,561 params, as the reference with the same arguments
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.array([0, 3], jnp.int32)
  z = jax.random.normal(jax.random.key(2), (2, 8))
  # The 'unsafe_rbg' key only makes the CPU compile of init faster (2x over 'rbg', more over threefry).
  fresh = jax.jit(lambda k: model.init(k, x, t, z, train=False))(jax.random.key(0, impl='unsafe_rbg'))
  assert count(fresh) == 208_561
  apply = jax.jit(lambda p, x, t, z: model.apply(p, x, t, z, train=False))
  # The reference's output conv starts at init scale 1e-10 (weights ~1e-6), so a fresh generator outputs ~0.
  assert np.abs(apply(fresh, x, t, z)).max() < 1e-3
  params = jitter(fresh)
  out = np.asarray(apply(params, x, t, z))
  assert out.shape == (2, 8, 8, 1) and out.dtype == np.float32
  assert np.isfinite(out).all() and np.abs(out).max() <= 1 and np.abs(out).std() > 1e-2
  assert np.abs(apply(params, x, t, -z) - out).max() > 1e-2, 'z must change x̂0 (AdaGN)'
  assert np.abs(apply(params, x, t[::-1], z) - out).max() > 1e-2, 't must change x̂0'


def test_tiny_discriminator_runs_on_8px_and_conditions():
  model = discriminator.SmallDiscriminator(ngf=8, t_emb_dim=16)
  x_prev, x_t = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 1))
  t = jnp.array([0, 1, 2, 3], jnp.int32)
  params = jax.jit(lambda k: model.init(k, x_prev, t, x_t, train=False))(jax.random.key(0, impl='unsafe_rbg'))
  apply = jax.jit(lambda p, x_prev, t, x_t: model.apply(p, x_prev, t, x_t, train=False))
  params = jitter(params)
  logits = np.asarray(apply(params, x_prev, t, x_t))
  assert logits.shape == (4,) and logits.dtype == np.float32 and np.isfinite(logits).all()
  assert np.abs(apply(params, x_prev, t[::-1], x_t) - logits).max() > 1e-3, 't must change the logits'
  assert np.abs(apply(params, x_t, t, x_t) - logits).max() > 1e-3, 'x_prev must change the logits'


def test_class_conditional_discriminator_projects_the_label():
  """num_classes adds only Embed(num_classes, 8·ngf), whose row for the label is dotted with the pooled
  features; labels must be given exactly when num_classes > 0."""
  x, t, labels = spec(4, 8, 8, 1), spec(4, dtype=jnp.int32), spec(4, dtype=jnp.int32)
  plain, _ = discriminator_shapes(discriminator.SmallDiscriminator(ngf=8), 8, 1)
  model = discriminator.SmallDiscriminator(ngf=8, num_classes=10)
  params = jax.eval_shape(lambda k, *a: model.init(k, *a, train=False), jax.random.key(0), x, t, x, labels)
  assert count(params) - count(plain) == 10 * 64
  assert jax.eval_shape(lambda p, *a: model.apply(p, *a, train=False), params, x, t, x, labels).shape == (4,)
  with pytest.raises(ValueError, match='labels must be None'):
    discriminator_shapes(model, 8, 1)


def test_res_block_is_its_composition():
  """The BigGAN++ block, whose first convolution's bias and time projection are added within the second AdaGN,
  computes (Conv₂(x) + Conv₁(AdaGN(Conv₀(AdaGN(x, z)) + Dense(SiLU(t)), z))) / √2 (AdaGN with its SiLU, as
  AdaGroupNorm without an offset; Flax's Conv and Dense) on its parameters, in value and in every gradient."""
  rng = np.random.default_rng(0)
  x, t_emb, z_emb = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 8, 8, 32), (2, 16), (2, 8)))
  block = ncsnpp.ResBlock(out_ch=48)
  params = block.init(jax.random.key(0), x, t_emb, z_emb, False)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

  def composed(params, x):
    p = params['params']
    adagn = lambda name, h: ncsnpp.AdaGroupNorm().apply({'params': p[name]}, h, z_emb)
    conv = lambda name, h, size: nn.Conv(48, (size, size)).apply({'params': p[name]}, h)
    h = conv('Conv_0', adagn('AdaGroupNorm_0', x), 3)
    h = h + nn.Dense(48).apply({'params': p['Dense_0']}, nn.silu(t_emb))[:, None, None]
    return (conv('Conv_2', x, 1) + conv('Conv_1', adagn('AdaGroupNorm_1', h), 3)) / np.sqrt(2)

  (out, block_vjp), (want, composed_vjp) = (jax.vjp(fn, params, x) for fn in (
      lambda p, x: block.apply(p, x, t_emb, z_emb, False), composed))
  cotangent = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  for got, expected in zip(jax.tree.leaves((out, block_vjp(cotangent))), jax.tree.leaves((want, composed_vjp(cotangent)))):
    np.testing.assert_allclose(got, expected, atol=3e-6 * float(jnp.max(jnp.abs(expected))))


def test_fits():
  assert all(discriminator.check_fits(variant, size) is None
             for variant in ('small', 'large') for size in (4, 8, 12, 256))
  assert 'small, large' in discriminator.check_fits('medium', 32)
  assert ncsnpp.num_resolutions_ok(8, (1, 2, 2, 2)) and ncsnpp.num_resolutions_ok(256, G256['ch_mult'])
  assert not ncsnpp.num_resolutions_ok(12, (1, 2, 2, 2)) and not ncsnpp.num_resolutions_ok(16, G256['ch_mult'])


@pytest.mark.parametrize('variant, size, halves, last', [
    ('small', 8, (False, True, False, False), 4),  # the reference: 8 -> 1
    ('small', 16, (False, True, True, False), 4),
    ('small', 32, (False, True, True, True), 4),  # the reference's layout from 32 px on
    ('small', 64, (False, True, True, True), 8),
    ('small', 12, (False, True, False, False), 6),  # 6 is even, but its half is below 4
    ('small', 4, (False, False, False, False), 4),
    ('large', 256, (True,) * 6, 4),  # the reference's
    ('large', 128, (True,) * 5 + (False,), 4),
    ('large', 64, (True,) * 4 + (False,) * 2, 4),
    ('large', 8, (True,) + (False,) * 5, 4),
])
def test_layout_halves_down_to_4x4(variant, size, halves, last):
  layout = discriminator.VARIANTS[variant].layout
  assert discriminator.halvings(layout, size) == halves
  assert discriminator.final_size(variant, size) == last
  # min_final_size=1 is the reference's rule, which halves whatever it is given.
  reference = tuple(h for _, h in layout)
  assert discriminator.halvings(layout, 256, min_final_size=1) == reference
  assert discriminator.final_size('small', 8, min_final_size=1) == 1


def test_layout_keeps_the_parameters_and_shrinks_the_last_map():
  """Every image size builds the same parameter tree (the rule only decides where halving stops); the map the
  minibatch stddev sees at 8 px is 4x4 where the reference's is 1x1."""
  trees = {size: jax.tree.map(lambda leaf: leaf.shape, discriminator_shapes(
      discriminator.SmallDiscriminator(ngf=8, t_emb_dim=16), size, 1)[0]) for size in (8, 32)}
  assert trees[8] == trees[32]
  seen = []  # shapes of init's and apply's calls
  original = discriminator.minibatch_stddev

  def spy(x):
    seen.append(x.shape[1:3])
    return original(x)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(discriminator, 'minibatch_stddev', spy)
    discriminator_shapes(discriminator.SmallDiscriminator(ngf=8, t_emb_dim=16), 8, 1)
    discriminator_shapes(discriminator.SmallDiscriminator(ngf=8, t_emb_dim=16, min_final_size=1), 8, 1)
  assert seen == [(4, 4)] * 2 + [(1, 1)] * 2


def test_zero_init_starts_the_discriminator_constant():
  """The reference's init (the second convs and the small D's final conv at scale 1e-10) makes a fresh D a
  constant; zero_init=False starts them at scale 1, with the same parameter tree, and a fresh D that varies."""
  x_prev, x_t = jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 1))
  t = jnp.zeros((8,), jnp.int32)
  spreads, trees = {}, {}
  for zero_init in (True, False):
    model = discriminator.SmallDiscriminator(ngf=8, t_emb_dim=16, zero_init=zero_init)
    params = model.init(jax.random.key(0), x_prev, t, x_t, train=False)
    trees[zero_init] = jax.tree.map(jnp.shape, params)
    spreads[zero_init] = float(jnp.std(model.apply(params, x_prev, t, x_t, train=False)))
  assert trees[True] == trees[False]
  assert spreads[True] < 1e-5 < 1e-2 < spreads[False], spreads


# ---- FIR resampling ----

TAPS = np.array([1., 3., 3., 1.])


def test_fir_keeps_constants_in_the_interior():
  x = jnp.full((1, 8, 8, 2), 0.7)
  np.testing.assert_allclose(ncsnpp.fir_downsample(x)[:, 1:-1, 1:-1], 0.7, rtol=1e-6)
  np.testing.assert_allclose(ncsnpp.fir_upsample(x)[:, 1:-1, 1:-1], 0.7, rtol=1e-6)


def test_fir_downsample_closed_form():
  """y[i,j] = Σ_ab f_a f_b x̃[2i+a, 2j+b] / 64, f = (1,3,3,1), x̃ = x zero-padded by 1."""
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((2, 3, 3, 3), np.float32)
  for i in range(3):
    for j in range(3):
      window = padded[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4]
      want[:, i, j] = np.einsum('a,b,nabc->nc', TAPS, TAPS, window) / 64
  np.testing.assert_allclose(ncsnpp.fir_downsample(jnp.asarray(x)), want, atol=1e-6)


def test_fir_upsample_closed_form():
  """Per axis: y[2m] = (x[m-1] + 3·x[m]) / 4, y[2m+1] = (3·x[m] + x[m+1]) / 4, x zero outside."""
  def up1d(x, axis):
    x = np.moveaxis(x, axis, 0)
    padded = np.pad(x, [(1, 1)] + [(0, 0)] * (x.ndim - 1))
    even = (padded[:-2] + 3 * padded[1:-1]) / 4
    odd = (3 * padded[1:-1] + padded[2:]) / 4
    return np.moveaxis(np.stack([even, odd], axis=1).reshape(2 * len(x), *x.shape[1:]), 0, axis)

  x = np.random.default_rng(1).standard_normal((2, 4, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(ncsnpp.fir_upsample(jnp.asarray(x)), up1d(up1d(x, 1), 2), atol=1e-6)


# ---- minibatch standard deviation ----

def stddev_feature(x, group):
  """numpy: s_b = mean_{hwc} √(Var over b's group of G consecutive examples + 1e-8), in float64."""
  x = x.astype(np.float64)
  return np.array([np.sqrt(x[i // group * group:(i // group + 1) * group].var(axis=0) + 1e-8).mean()
                   for i in range(x.shape[0])])


@pytest.mark.parametrize('batch, group', [(8, 4), (2, 2), (4, 4), (1, 1)])
def test_minibatch_stddev(batch, group):
  x = np.random.default_rng(batch).standard_normal((batch, 3, 3, 5)).astype(np.float32)
  out = np.asarray(discriminator.minibatch_stddev(jnp.asarray(x)))
  assert out.shape == (batch, 3, 3, 6)
  np.testing.assert_array_equal(out[..., :5], x)
  feature = stddev_feature(x, group)
  np.testing.assert_allclose(out[..., 5], np.broadcast_to(feature[:, None, None], (batch, 3, 3)), rtol=1e-5)


def test_minibatch_stddev_of_identical_examples_is_the_eps_floor():
  x = jnp.tile(jax.random.normal(jax.random.key(0), (1, 2, 2, 3)), (4, 1, 1, 1))
  np.testing.assert_allclose(discriminator.minibatch_stddev(x)[..., 3], np.sqrt(1e-8), rtol=1e-6)


def test_minibatch_stddev_batch_must_fill_groups():
  assert discriminator.check_batch(2) is None and discriminator.check_batch(8) is None
  assert 'multiple of 4' in discriminator.check_batch(6)
  with pytest.raises(ValueError, match='batch 6'):
    discriminator.minibatch_stddev(jnp.zeros((6, 2, 2, 1)))


# ---- convolutions with canonical gradients (xla_cpu.conv_general_dilated, every network's on the CPU) ----

def lax_conv(x, w, padding):
  return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision='highest')


def ddjax_conv(x, w, padding, implementation=xla_cpu.conv_general_dilated):
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  return implementation(x, w, (1, 1), padding, dimension_numbers=numbers, precision='highest')


@pytest.mark.parametrize('size, kernel, padding', [
    (8, 3, 'SAME'), (2, 3, 'SAME'), (1, 3, 'SAME'), (5, 1, 'SAME'), (6, 3, 'VALID'), (4, 3, ((2, 0), (1, 1)))])
def test_conv_values_and_gradients_to_second_order_are_lax(size, kernel, padding):
  """Sizes where the kernel covers more positions than the image take the patches path; the second order is
  R1's: the gradient in w and in x of ‖∇_x Σ tanh(conv)‖²."""
  rng = np.random.default_rng(size)
  x = jnp.asarray(rng.standard_normal((3, size, size, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 4, 5)), jnp.float32)

  def derivatives(fn):
    first = jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w, padding))), (0, 1))(x, w)
    r1 = lambda x, w: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.tanh(fn(x, w, padding))))(x) ** 2)
    return (fn(x, w, padding), *first, *jax.grad(r1, (0, 1))(x, w))

  for got, want in zip(derivatives(ddjax_conv), derivatives(lax_conv)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.xla_cpu
@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's convolution layouts")
@pytest.mark.parametrize('container', ['cond', 'scan'])
def test_conv_gradients_in_cond_and_scan_are_canonical(container):
  """XLA:CPU's layout pass does not reach a lax.cond branch or a loop body (DDGAN's lazy R1, gradient
  accumulation), where lax's own weight gradient stays non-canonical, a naive loop nest; the networks'
  convolutions (conv.conv_general_dilated, xla_cpu's in a CPU program), first and second order, are all
  NHWC/HWIO there."""
  x, w = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 5))
  selected = lambda x, w, padding: ddjax_conv(x, w, padding, conv.conv_general_dilated)
  r1 = lambda w: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.tanh(selected(x, w, 'SAME'))))(x) ** 2)
  if container == 'cond':
    program = jax.jit(lambda w: jax.lax.cond(jnp.sum(w) > 0, jax.grad(r1), jnp.zeros_like, w))
  else:
    program = jax.jit(lambda w: jax.lax.scan(lambda total, _: (total + jax.grad(r1)(w), None), w, length=2)[0])
  assert set(re.findall(r'dim_labels=([\w>-]+)', program.lower(w).compile().as_text())) == {'b01f_01io->b01f'}
