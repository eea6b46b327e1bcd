"""The networks' convolutions: nn.Conv's parameters and math, computed per platform (xla_cpu.select).

`Conv` is nn.Conv, `upsampled_conv` a nearest 2× upsampling followed by a 3×3 convolution (given to Conv as its
conv_general_dilated), and `ConvAndBias` a Conv that returns its bias apart for the next GroupNorm to add; in a
program lowered for the CPU their convolutions are xla_cpu's.
"""
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from ddjax.models import xla_cpu


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """lax.conv_general_dilated; xla_cpu.conv_general_dilated (canonical gradients) in a program lowered for the
  CPU."""
  return xla_cpu.select(xla_cpu.conv_general_dilated, lax.conv_general_dilated, lhs, rhs,
                        window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                        precision=precision, preferred_element_type=preferred_element_type)


def plain_upsampled_conv(lhs, rhs, window_strides, padding, **options):
  """The convolution of lhs (NHWC) upsampled 2× by nearest neighbour: each pixel repeated over a 2×2 block."""
  return lax.conv_general_dilated(jnp.repeat(jnp.repeat(lhs, 2, axis=1), 2, axis=2), rhs, window_strides, padding,
                                  **options)


def upsampled_conv(lhs, rhs, window_strides, padding, **options):
  """plain_upsampled_conv; xla_cpu.upsampled_conv (four 2×2 convolutions of lhs itself) in a program lowered for
  the CPU, which takes a 3×3 'SAME' convolution only. nn.Conv's conv_general_dilated signature."""
  return xla_cpu.select(xla_cpu.upsampled_conv, plain_upsampled_conv, lhs, rhs, window_strides=window_strides,
                        padding=padding, **options)


# nn.Conv, its parameters and their names unchanged.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class ConvAndBias(nn.Conv):
  """Conv that returns its convolution and its bias apart, for a GroupNorm to add the bias as part of its offset
  (normalization.group_norm), which XLA:CPU's kernel adds without a pass over the activation. The parameters,
  their names and their initial values are Conv's (the bias is created after the kernel, as nn.Conv creates
  them)."""
  use_bias: bool = False  # the convolution's; the bias is returned, not added
  conv_general_dilated: Any = conv_general_dilated

  @nn.compact
  def __call__(self, inputs):
    y = super().__call__(inputs)
    return y, self.param('bias', self.bias_init, (self.features,), self.param_dtype).astype(y.dtype)
