"""GroupNorm as both networks use it: nn.GroupNorm's math, parameters and names, with an offset added to its input
and an optional SiLU after it; xla_cpu.group_norm computes it in a program lowered for the CPU."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from ddjax.models import xla_cpu

EPSILON = 1e-6  # GroupNorm's ε: nn.GroupNorm's default and score_sde's


def plain_group_norm(x, scale, bias, offset=None, *, num_groups: int, epsilon: float, silu: bool = False):
  """(x' − μ_g)/√(σ²_g + ε)·scale + bias over NHWC float32 x' = x + offset, μ_g and σ²_g = E[x'²] − μ_g² (Flax's)
  over each example's group of C/num_groups channels and all pixels, then SiLU if `silu`; scale and bias [C], or
  [B, C] for a per-example affine (AdaGN), offset [C], [B, C] or None. Differentiated by autodiff."""
  b, h, w, c = x.shape
  per_example = lambda v: v.astype(jnp.float32).reshape(-1 if v.ndim == 2 else 1, 1, 1, c)
  if offset is not None:
    x = x + per_example(offset)
  groups = x.reshape(b, h, w, num_groups, c // num_groups)
  mean = jnp.mean(groups, axis=(1, 2, 4), keepdims=True)
  variance = jnp.maximum(0.0, jnp.mean(jnp.square(groups), axis=(1, 2, 4), keepdims=True) - jnp.square(mean))
  y = ((groups - mean) * lax.rsqrt(variance + epsilon)).reshape(x.shape) * per_example(scale) + per_example(bias)
  return nn.silu(y) if silu else y


def group_norm(x, scale, bias, num_groups: int, epsilon: float, silu: bool = False, offset=None):
  """plain_group_norm, or xla_cpu.group_norm (the same to float32 rounding) in a program lowered for the CPU."""
  return xla_cpu.select(xla_cpu.group_norm, plain_group_norm, x, scale, bias, offset, num_groups=num_groups,
                        epsilon=epsilon, silu=silu)


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters and names (scale, bias) and its results to float32 rounding; statistics in float32
  whatever the dtype. `silu`: followed by SiLU."""
  num_groups: int
  dtype: Any = jnp.float32
  epsilon: float = EPSILON
  silu: bool = False

  @nn.compact
  def __call__(self, x, offset=None):
    """GroupNorm of x + offset ([C] or [B, C]; see group_norm)."""
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    y = group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon, self.silu, offset)
    return y.astype(self.dtype)
