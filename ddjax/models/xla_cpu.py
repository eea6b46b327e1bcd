"""Kernels shaped for XLA:CPU, and the choice per platform between them and the plain formulation.

The networks' convolutions and GroupNorms (conv.py, normalization.py) and the FID Inception's convolutions compute
the plain formulation (Flax's and lax's ops, differentiated by autodiff), except in a program lowered for the CPU,
where a kernel here that computes the same takes its place: `select(kernel, plain, *arrays, **static)` is
`lax.platform_dependent(*arrays, cpu=kernel, default=plain)` (both traced, the lowering keeps the one for its
platform). The kernels take the plain functions' arguments and create no parameters, so the parameter tree, and a
checkpoint, is the same under either; tests/test_formulations.py checks that each equals its plain formulation in
value and gradient, in float32 and bfloat16. docs/performance.md has the measurements behind each kernel.

DDJAX_FORMULATION=xla_cpu or =plain, read when a program is traced (by `select` only), forces one formulation on
every platform: benchmarks/gpu.py times the ImageNet-64 train step under both on a GPU.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FORMULATION_VARIABLE = 'DDJAX_FORMULATION'
FORMULATIONS = ('xla_cpu', 'plain')


def select(kernel, plain, *arrays, **static):
  """kernel(*arrays, **static) in a program lowered for the CPU, plain(*arrays, **static) for any other platform
  (or the one DDJAX_FORMULATION names); `arrays` are pytrees of arrays, `static` the Python values both take."""
  forced = os.environ.get(FORMULATION_VARIABLE, '')
  if forced and forced not in FORMULATIONS:
    raise ValueError(f'{FORMULATION_VARIABLE}={forced!r} is invalid; allowed: {", ".join(FORMULATIONS)} or unset')
  if forced:
    return (kernel if forced == 'xla_cpu' else plain)(*arrays, **static)
  return lax.platform_dependent(*arrays, cpu=functools.partial(kernel, **static),
                                default=functools.partial(plain, **static))


# ---- convolutions whose gradients of every order are canonical convolutions ----

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def is_one(values) -> bool:
  return values is None or all(v == 1 for v in values)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """lax.conv_general_dilated, whose gradients (of every order) are canonical convolutions for a 2-D stride-1
  NHWC/HWIO convolution; other convolutions go to lax unchanged.

  XLA:CPU runs a convolution on its fast kernel only in the canonical layout (NHWC input, HWIO kernel, NHWC
  output, no window reversal), and its pass that rewrites other layouts into it reaches neither a convolution in a
  `lax.cond` branch or a loop body (DDGAN's lazy R1, gradient accumulation) nor one whose operands the simplifier
  swapped (a kernel larger than its image); autodiff's weight and small-image gradients are such convolutions.
  Here the gradient is defined as canonical convolutions, recursively, and a kernel that covers more positions
  than its image is applied as patches times a matrix."""
  simple = (lhs.ndim == 4 and is_one(window_strides) and is_one(lhs_dilation) and is_one(rhs_dilation)
            and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC)
  if not simple:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  return _conv(lhs, rhs, tuple((int(lo), int(hi)) for lo, hi in padding), precision)


def _direct(x, w, padding, precision):
  """The convolution itself: XLA's, or patches @ kernel where XLA would swap the operands (kernel positions
  outnumber input positions, as a 3×3 kernel on a 2×2 image)."""
  kh, kw, c_in, c_out = w.shape
  if kh * kw <= x.shape[1] * x.shape[2]:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    precision=precision)
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
  height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = jnp.concatenate([x[:, i:i + height, j:j + width] for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, w.reshape(kh * kw * c_in, c_out), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, padding, precision):
  return _direct(x, w, padding, precision)


def _conv_fwd(x, w, padding, precision):
  # _conv, not _direct: an outer differentiation (R1's double backward) sees this forward too, and must meet
  # the custom rule here as well.
  return _conv(x, w, padding, precision), (x, w)


def _conv_bwd(padding, precision, residuals, grad):
  """dx: the output gradient correlated with the kernel flipped and its channels swapped; dw: the inputs'
  channels as the batch and the output gradient as the kernel (the layout XLA's own rewrite would build)."""
  x, w = residuals
  kh, kw = w.shape[:2]
  dx_padding = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]), (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
  dx = _conv(grad, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), dx_padding, precision)
  dw = _conv(x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3), padding, precision).transpose(1, 2, 0, 3)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


# For the output rows of each parity (0: even, 1: odd), which of a 3×3 kernel's rows reach each of the two input
# rows they see (i − 1 and i for even rows, i and i + 1 for odd ones) after a nearest 2× upsampling; likewise for
# columns.
_UPSAMPLED_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsampled_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
  """The 3×3 'SAME' convolution of lhs upsampled 2× by nearest neighbour, computed on lhs itself: each of the
  output's four phases (row and column parity) sees two rows and two columns of lhs, so it is a 2×2 convolution
  of lhs with the 3×3 kernel's taps summed accordingly, padded on the side its rows and columns reach past.

  16 taps over H×W instead of 9 over 2H×2W, and the upsampled image is never formed (nor kept for the weight
  gradient); four convolutions rather than one with 4× the output channels, whose (H + 1)×(W + 1) weight gradient
  is a kernel larger than its image, which XLA:CPU runs slowly (conv_general_dilated above). nn.Conv's
  conv_general_dilated signature."""
  plain = all(is_one(v) for v in (window_strides, lhs_dilation, rhs_dilation)) and feature_group_count == 1
  if rhs.shape[:2] != (3, 3) or padding != 'SAME' or not plain or lhs.ndim != 4:
    raise ValueError(f'upsampled_conv takes a 3×3 SAME NHWC convolution without strides, dilations or groups; '
                     f'got kernel {rhs.shape}, strides {window_strides}, padding {padding}')
  del dimension_numbers  # NHWC / HWIO, nn.Conv's
  b, h, w, _ = lhs.shape
  taps = jnp.asarray(_UPSAMPLED_TAPS)
  kernels = jnp.einsum('prh,qsw,hwio->pqrsio', taps, taps, rhs.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST).astype(rhs.dtype)
  # Output (2i + p, 2j + q) is phases[p][q][i, j]: even rows see lhs rows i − 1 and i (padded above), odd ones
  # i and i + 1 (padded below); likewise for columns.
  phases = [[conv_general_dilated(lhs, kernels[p, q], (1, 1), ((1 - p, p), (1 - q, q)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
             for q in (0, 1)] for p in (0, 1)]
  rows = [jnp.stack(phases[p], axis=3) for p in (0, 1)]  # [B, H, W, 2 (q), C_out] each
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, rhs.shape[-1])


def halo_conv(lhs, rhs, window_strides, padding, **options):
  """lax.conv_general_dilated (NHWC / HWIO, padding as (low, high) pairs) where every unpadded stride-1 spatial
  axis is padded by a halo of (k − 1)/2 zeros on each side and the output cropped back by it: the same numbers,
  as a zero-padded convolution, which XLA:CPU runs faster than an unpadded one (the Inception stem's;
  docs/performance.md)."""
  halo = [(k - 1) // 2 if s == 1 and tuple(p) == (0, 0) else 0
          for k, s, p in zip(rhs.shape[:2], window_strides, padding)]
  y = lax.conv_general_dilated(lhs, rhs, window_strides, [(lo + e, hi + e) for (lo, hi), e in zip(padding, halo)],
                               **options)
  return y[:, halo[0]:y.shape[1] - halo[0], halo[1]:y.shape[2] - halo[1]]


# ---- GroupNorm: per-channel sums first, a written-out gradient, the offset and SiLU within its passes ----


def _group_mean(channel_sums, num_groups: int, pixels: int):
  """[B, C] sums over `pixels` pixels per channel -> each channel's group mean (over the group's channels and
  those pixels), [B, C]: a product with a block-diagonal averaging matrix, computed once, where a reshape, sum and
  repeat would be fused by XLA:CPU into the elementwise pass that consumes it and gathered per element."""
  c = channel_sums.shape[-1]
  group_size = c // num_groups
  group = jnp.arange(c) // group_size
  averaging = (group[:, None] == group[None, :]).astype(jnp.float32) / (pixels * group_size)
  return jnp.dot(channel_sums, averaging, precision=lax.Precision.HIGHEST)


def _group_stats(x, offset, num_groups: int, epsilon: float):
  """(each channel's group mean of x + offset, 1/√(its group variance + ε), the per-channel sums of x), [B, C];
  variance as E[x²] − E[x]², as Flax's. The sums of x + offset come from those of x, Σ(x + o) = Σx + P·o and
  Σ(x + o)² = Σx² + o·(2·Σx + P·o) over P pixels, so that x + offset is never formed."""
  pixels = x.shape[1] * x.shape[2]
  x_sums = sums = jnp.sum(x, axis=(1, 2))
  square_sums = jnp.sum(jnp.square(x), axis=(1, 2))
  if offset is not None:
    sums, square_sums = x_sums + pixels * offset, square_sums + offset * (2 * x_sums + pixels * offset)
  mean = _group_mean(sums, num_groups, pixels)
  variance = jnp.maximum(0.0, _group_mean(square_sums, num_groups, pixels) - jnp.square(mean))
  return mean, lax.rsqrt(variance + epsilon), x_sums


def _normalize(x, scale, bias, center, inv_std):
  """(x − center)·inv_std·scale + bias as one multiply-add per element."""
  a = inv_std * scale
  return x * a[:, None, None] + (bias - center * a)[:, None, None]


def group_norm(x, scale, bias, offset=None, *, num_groups: int, epsilon: float, silu: bool = False):
  """normalization.plain_group_norm's result: (x' − μ_g)/√(σ²_g + ε)·scale + bias over NHWC float32
  x' = x + offset, then SiLU if `silu`; scale and bias [C] or [B, C], offset [C], [B, C] or None.

  XLA:CPU runs Flax's reduction of [B, H, W, G, C/G] over (H, W, C/G) as two slow strided reductions, so the
  sums are taken per channel over H, W first (the contiguous channel axis stays minor) and then per group. The
  gradient is written out (a custom VJP) as one pass of two per-channel sums and one elementwise pass, where
  autodiff makes several; the SiLU's backward recomputes the normalised values from x, so the forward stores
  nothing of its own; and the offset (a convolution's bias plus a block's conditioning) enters through the
  per-channel sums, so that x + offset, and its gradient's sums, cost no pass over the activation."""
  if offset is not None:
    offset = jnp.broadcast_to(offset.astype(jnp.float32), (x.shape[0], x.shape[-1]))
  return _group_norm(x, scale, bias, num_groups, epsilon, silu, offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, epsilon, silu, offset):
  return _group_norm_forward(x, scale, bias, num_groups, epsilon, silu, offset)[0]


def _group_norm_forward(x, scale, bias, num_groups, epsilon, silu, offset):
  mean, inv_std, x_sums = _group_stats(x, offset, num_groups, epsilon)
  center = mean if offset is None else mean - offset  # x' − μ = x − (μ − offset)
  y = _normalize(x, scale, bias, center, inv_std)
  # x's sums only for the offset's gradient
  return jax.nn.silu(y) if silu else y, (x, scale, bias, center, inv_std, None if offset is None else x_sums)


def _group_norm_backward(num_groups, epsilon, silu, residuals, dy):
  """With x̂ = (x' − μ)·r and g = dy·scale: dx' = r·(g − mean_group(g) − x̂·mean_group(g·x̂)), which is
  dy·(r·scale) + x·(−r²·m₂) + (r²·m₂·c − r·m₁) with m₁, m₂ those group means and c = μ − offset; all that is
  needed of dy are its per-channel sums Σ dy and Σ dy·x. dx = dx', and the offset's gradient is dx' summed over
  the pixels, from those sums too. After a SiLU, dy is first multiplied by SiLU's derivative
  σ(y)·(1 + y·(1 − σ(y))) at the normalised values y, recomputed here from x."""
  del epsilon
  x, scale, bias, center, inv_std, x_sums = residuals
  if silu:
    # The barrier keeps XLA from merging this recomputation with the forward pass's (CSE), which would bring
    # back the stored sigmoid.
    y = _normalize(*lax.optimization_barrier((x, scale, bias, center, inv_std)))
    sigmoid = jax.nn.sigmoid(y)
    dy = dy * sigmoid * (1 + y * (1 - sigmoid))
  pixels = x.shape[1] * x.shape[2]
  sum_dy = jnp.sum(dy, axis=(1, 2))                                    # [B, C]
  sum_dy_xhat = inv_std * (jnp.sum(dy * x, axis=(1, 2)) - center * sum_dy)
  m1, m2 = (_group_mean(scale * per_channel, num_groups, pixels) for per_channel in (sum_dy, sum_dy_xhat))
  slope = -jnp.square(inv_std) * m2
  shift = -slope * center - inv_std * m1
  dx = dy * (inv_std * scale)[:, None, None] + x * slope[:, None, None] + shift[:, None, None]
  # dx summed over the pixels
  d_offset = None if x_sums is None else inv_std * scale * sum_dy + slope * x_sums + pixels * shift
  if scale.ndim == 2:  # a per-example affine: its gradients per example
    return dx, sum_dy_xhat, sum_dy, d_offset
  # The batch's sums from the [B, C] ones: without the barrier XLA folds sum(sum(dy, (1, 2)), 0) into a second
  # reduction of the whole of dy, one more activation-sized pass.
  sum_dy_xhat, sum_dy = lax.optimization_barrier((sum_dy_xhat, sum_dy))
  return dx, jnp.sum(sum_dy_xhat, axis=0), jnp.sum(sum_dy, axis=0), d_offset


_group_norm.defvjp(_group_norm_forward, _group_norm_backward)
