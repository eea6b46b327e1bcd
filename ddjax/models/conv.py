"""Convolutions whose gradients of every order are convolutions XLA:CPU runs well.

XLA:CPU runs a convolution on its fast Eigen kernel only in the canonical layout (NHWC input, HWIO kernel, NHWC
output, no window reversal); a pass rewrites the others into that layout with transposes, but it does not reach
convolutions inside a `lax.cond` branch or a loop body, nor ones whose operands the simplifier swapped (a kernel
larger than its input), and those fall to a naive loop nest. Autodiff emits exactly such convolutions for a
weight gradient and for the gradient of a small image. Minimal case: the weight gradient of a 3×3 conv on
[64, 8, 8, 16] takes 0.9 ms jitted and 23 ms inside `lax.cond` or a one-trip `fori_loop` (jax 0.10.2). So
DDGAN's lazy R1 (a double backward of D under `lax.cond`) took 454 ms per R1 step, D's 2×2 level 1.5 ms per
convolution, and the diffusion step with `train.grad_accum_steps` 2 (micro-batches in a `lax.scan`) 30× its
single-batch time (README, Performance).

`conv_general_dilated` here is a drop-in for `lax.conv_general_dilated` (`Conv` below: nn.Conv with it, the
parameters unchanged) that, on the CPU backend and for stride-1 2-D NHWC/HWIO convolutions, defines its own
gradient as canonical convolutions (recursively, so a double backward is canonical too), and computes a
convolution whose kernel covers more positions than its image as patches times a matrix. Other convolutions, and
every convolution on GPU and TPU (whose XLA maps autodiff's gradient convolutions onto cuDNN's and its own
backward kernels), go to lax unchanged.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def is_one(values) -> bool:
  return values is None or all(v == 1 for v in values)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """lax.conv_general_dilated, with canonical gradients for 2-D stride-1 NHWC/HWIO convolutions on a CPU."""
  simple = (jax.default_backend() == 'cpu' and lhs.ndim == 4 and is_one(window_strides)
            and is_one(lhs_dilation) and is_one(rhs_dilation) and feature_group_count == 1
            and batch_group_count == 1 and preferred_element_type is None
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


# nn.Conv with these gradients; its parameters and their names are nn.Conv's.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class ConvAndBias(nn.Conv):
  """Conv that returns its convolution and its bias apart, for a GroupNorm to add the bias within its own passes
  (normalization.group_norm's offset): added here, it costs a pass over the whole output. The parameters, their
  names and their initial values are Conv's (the bias is created after the kernel, as nn.Conv creates them)."""
  use_bias: bool = False  # the convolution's; the bias is returned, not added
  conv_general_dilated: Any = conv_general_dilated

  @nn.compact
  def __call__(self, inputs):
    y = super().__call__(inputs)
    return y, self.param('bias', self.bias_init, (self.features,), self.param_dtype).astype(y.dtype)
