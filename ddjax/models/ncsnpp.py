"""DDGAN's generator: NCSN++ with AdaGN (Xiao et al. 2022, NVlabs/denoising-diffusion-gan), NHWC.

x̂0 = G(x_t, t, z): an NCSN++ U-Net whose GroupNorms take their scale and shift from a latent z (AdaGN),
with BigGAN-style residual blocks that resample with a FIR filter inside, a positional embedding of the
discrete step t, and the input pyramid of `progressive_input='residual'`. The reference's other options
(DDPM blocks, progressive output paths, input_skip, Fourier features of log σ) are used by no DDGAN
configuration and are left out.

The shared layers live here too: FIR resampling as a fixed depthwise convolution, the positional embedding,
and the two initialisers of the reference, which matter for GAN training stability.
"""
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ddjax.models import normalization
from ddjax.models.conv import Conv, ConvAndBias

FIR_KERNEL = (1, 3, 3, 1)


def default_init(scale: float = 1.0):
  """score_sde's DDPM init: U(±√(3·scale / fan_avg)); scale 0 means 1e-10, a near-silent layer."""
  return nn.initializers.variance_scaling(scale or 1e-10, 'fan_avg', 'uniform')


def dense_init(scale: float = 1.0):
  """DDGAN's `dense_layer` init: U(±√(3·scale / fan_out)); scale 0 means 1e-10.

  The reference asks for 'fan_avg', but its fan helper returns fan_out for every mode except 'fan_in';
  we keep what it computes, not what it names.
  """
  return nn.initializers.variance_scaling(scale or 1e-10, 'fan_out', 'uniform')


def positional_embedding(t, dim: int, max_positions: float = 10_000.0):
  """[sin(t·f_i), cos(t·f_i)] with f_i = max_positions^(-i/(dim/2 - 1)), i < dim/2 (score_sde's)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def upfirdn_1d(x, taps, *, axis: int, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
  """StyleGAN2's upfirdn along one axis: insert up−1 zeros after every sample, zero-pad by `pad`, convolve with
  `taps` (a true convolution, y_i = Σ_j x_{i+j}·taps_{K−1−j}), keep every down-th sample."""
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (pad[0], pad[1] + up - 1, up - 1)  # interior padding inserts the zeros
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  k = len(taps)
  count = (x.shape[axis] - k) // down + 1
  return sum(float(taps[k - 1 - j]) * lax.slice_in_dim(x, j, j + down * (count - 1) + 1, down, axis)
             for j in range(k))


def upfirdn(x, taps, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0), gain: float = 1.0):
  """upfirdn2d on NHWC with the separable kernel outer(f, f)·gain, f = taps / sum(taps): one pass over H, one
  over W, each a weighted sum of strided slices, where a depthwise convolution, which computes the same, has a
  gradient XLA:CPU runs slowly (docs/performance.md)."""
  f = np.asarray(taps, np.float64) / np.sum(taps) * np.sqrt(gain)
  return upfirdn_1d(upfirdn_1d(x, f, axis=1, up=up, down=down, pad=pad), f, axis=2, up=up, down=down, pad=pad)


def fir_downsample(x, taps=FIR_KERNEL):
  """y = (x * k)↓2 with k = outer(f, f) / sum(f)²: a constant image stays that constant away from the border."""
  p = len(taps) - 2
  return upfirdn(x, taps, down=2, pad=((p + 1) // 2, p // 2))


def fir_upsample(x, taps=FIR_KERNEL):
  """y = (x↑2) * 4k: zero insertion, then the kernel with gain 4 so that constants are kept."""
  p = len(taps) - 2
  return upfirdn(x, taps, up=2, pad=((p + 1) // 2 + 1, p // 2), gain=4.0)


def num_groups(channels: int) -> int:
  """score_sde's GroupNorm: min(C/4, 32) groups (and ε = normalization.EPSILON)."""
  return min(channels // 4, 32)


def group_norm(x, dtype, silu: bool = False):
  return normalization.GroupNorm(num_groups=num_groups(x.shape[-1]), dtype=dtype, silu=silu)(x)


def conv(features: int, size: int, dtype, scale: float = 1.0, bias_apart: bool = False, **kwargs):
  """Conv (stride 1, 'SAME' unless kwargs say otherwise) with score_sde's init and a zero bias; with
  `bias_apart` a ConvAndBias, which returns its bias instead of adding it."""
  return (ConvAndBias if bias_apart else Conv)(features, (size, size), kernel_init=default_init(scale),
                                               dtype=dtype, **kwargs)


def num_resolutions_ok(image_size: int, ch_mult) -> bool:
  """True when image_size halves exactly len(ch_mult)-1 times, as the skip connections need."""
  return image_size >= 1 and image_size % 2 ** (len(ch_mult) - 1) == 0


class AdaGroupNorm(nn.Module):
  """SiLU(AdaGN(x, z)): AdaGN is γ(z)·GN(x) + β(z), GroupNorm without affine, (γ, β) = Dense(z_emb) with bias
  init (1, 0). The norm, affine and SiLU in float32 whatever the dtype (normalization.group_norm)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, z_emb, offset=None):
    """SiLU(AdaGN(x + offset, z)), offset [C] or [B, C]: the norm adds it (normalization.group_norm)."""
    c = x.shape[-1]
    bias_init = lambda key, shape, dtype: jnp.concatenate([jnp.ones(c, dtype), jnp.zeros(c, dtype)])
    style = nn.Dense(2 * c, kernel_init=dense_init(), bias_init=bias_init, dtype=self.dtype)(z_emb)
    gamma, beta = jnp.split(style.astype(jnp.float32), 2, axis=-1)
    return normalization.group_norm(x.astype(jnp.float32), gamma, beta, num_groups(c), normalization.EPSILON,
                                    silu=True, offset=offset).astype(self.dtype)


class ResBlock(nn.Module):
  """BigGAN++ block with AdaGN (ResnetBlockBigGANpp_Adagn):

  h = Conv(resample(act(AdaGN(x, z)))) + Dense(act(t_emb)); h = Conv₀(dropout(act(AdaGN(h, z))));
  out = (skip(resample(x)) + h) / √2, skip a 1x1 conv when the channels change or the block resamples.
  Conv₀ starts near zero, so a fresh block is close to its skip path.
  """
  out_ch: int | None = None
  resample: Literal['none', 'up', 'down'] = 'none'
  dropout: float = 0.0
  fir_kernel: tuple[int, ...] = FIR_KERNEL
  skip_rescale: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb, z_emb, train: bool):
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    h = AdaGroupNorm(self.dtype)(x, z_emb)
    if self.resample != 'none':
      resample = fir_upsample if self.resample == 'up' else fir_downsample
      h, x = resample(h, self.fir_kernel), resample(x, self.fir_kernel)
    # AdaGN(h + bias + time projection): the sum is the norm's offset (normalization.group_norm).
    h, offset = conv(out_ch, 3, self.dtype, bias_apart=True, name='Conv_0')(h)
    if t_emb is not None:
      offset = offset + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(nn.silu(t_emb))
    h = AdaGroupNorm(self.dtype)(h, z_emb, offset)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(out_ch, 3, self.dtype, scale=0.0, name='Conv_1')(h)
    if in_ch != out_ch or self.resample != 'none':
      x = conv(out_ch, 1, self.dtype, name='Conv_2')(x)
    return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class AttnBlock(nn.Module):
  """Self-attention over all H·W positions (AttnBlockpp): q, k, v = NIN(GN(x)),
  out = (x + NIN₀(softmax(q·kᵀ/√C)·v)) / √2, NIN a per-pixel dense layer and NIN₀ starting near zero."""
  skip_rescale: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = group_norm(x, self.dtype)
    q, k, v = (nn.Dense(c, kernel_init=default_init(0.1), dtype=self.dtype)(h) for _ in range(3))
    logits = jnp.einsum('bhwc,bijc->bhwij', q, k).reshape(b, height, width, height * width) * c ** -0.5
    # Softmax in float32: a bf16 sum over H·W (256 terms at 16x16) loses the small weights.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    h = jnp.einsum('bhwn,bnc->bhwc', weights, v.reshape(b, height * width, c))
    h = nn.Dense(c, kernel_init=default_init(0.0), dtype=self.dtype)(h)
    return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class PyramidDownsample(nn.Module):
  """StyleGAN2's fused FIR-blur + 3x3 stride-2 conv (Downsample with fir and with_conv): the input
  pyramid's step to the next resolution. The blur pads (p+1)//2, p//2 with p = len(taps) - 2 + (3 - 1),
  so that the VALID conv lands on H/2."""
  out_ch: int
  fir_kernel: tuple[int, ...] = FIR_KERNEL
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = len(self.fir_kernel)
    x = upfirdn(x, self.fir_kernel, pad=((p + 1) // 2, p // 2))
    return conv(self.out_ch, 3, self.dtype, strides=(2, 2), padding='VALID')(x)


def pixel_norm(z):
  """z / √(mean(z²) + 1e-8) per example."""
  return z * lax.rsqrt(jnp.mean(z ** 2, axis=-1, keepdims=True) + 1e-8)


class NCSNpp(nn.Module):
  """DDGAN's generator: (x_t [B,H,W,C], t int32 [B] in 0..T-1, z [B,nz], labels int [B] or None) -> x̂0.

  Returns x̂0 [B,H,W,num_channels] float32, through tanh unless not_use_tanh. `attn_resolutions` are
  feature-map widths; H must halve exactly len(ch_mult)-1 times (`num_resolutions_ok`). The latent goes
  through PixelNorm and n_mlp+1 dense layers to z_emb (the reference's `z_transform`), which drives every
  AdaGN. Class conditioning (num_classes > 0) follows StyleGAN2-ADA's mapping network: a learned class
  embedding of size nz, PixelNorm-ed, is concatenated to the PixelNorm-ed z, so the class reaches every
  AdaGN; it works with or without the time conditioning. train=True with dropout > 0 needs a 'dropout'
  rng. Defaults are the paper's CIFAR-10 settings.
  """
  nf: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.0
  num_channels: int = 3
  nz: int = 100
  z_emb_dim: int = 256
  n_mlp: int = 4
  skip_rescale: bool = True
  progressive_input: Literal['none', 'residual'] = 'residual'
  fir_kernel: tuple[int, ...] = FIR_KERNEL
  conditional: bool = True
  not_use_tanh: bool = False
  centered: bool = True
  num_classes: int = 0
  dtype: Any = jnp.float32

  def mapping(self, z, labels):
    """z_emb = MLP(PixelNorm(z) [, PixelNorm(Embed(labels))]), SiLU after every one of n_mlp+1 layers."""
    h = pixel_norm(z.astype(jnp.float32))
    if self.num_classes:
      c_emb = nn.Embed(self.num_classes, self.nz, name='class_embedding')(labels)
      h = jnp.concatenate([h, pixel_norm(c_emb)], axis=-1)
    for i in range(self.n_mlp + 1):
      h = nn.silu(nn.Dense(self.z_emb_dim, kernel_init=dense_init(), dtype=self.dtype, name=f'mapping_{i}')(h))
    return h

  def time_embedding(self, t):
    """Dense(act(Dense(positional(t, nf)))) to 4·nf, or None without time conditioning."""
    if not self.conditional:
      return None
    dense = lambda i: nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=self.dtype, name=f'time_{i}')
    return dense(1)(nn.silu(dense(0)(positional_embedding(t, self.nf))))

  @nn.compact
  def __call__(self, x_t, t, z, labels=None, *, train: bool):
    if (labels is None) != (self.num_classes == 0):
      raise ValueError(f'labels must be None exactly when num_classes == 0 (num_classes={self.num_classes})')
    z_emb = self.mapping(z, labels)
    t_emb = self.time_embedding(t)
    block = lambda **kw: ResBlock(dropout=self.dropout, fir_kernel=self.fir_kernel,
                                  skip_rescale=self.skip_rescale, dtype=self.dtype, **kw)
    attention = lambda h: AttnBlock(skip_rescale=self.skip_rescale, dtype=self.dtype)(h)
    x = x_t.astype(self.dtype)
    if not self.centered:
      x = 2 * x - 1  # data in [0, 1]

    # Down: every level's outputs are kept for the skips; the input pyramid follows the resolution.
    pyramid = x
    hs = [conv(self.nf, 3, self.dtype)(x)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(out_ch=self.nf * mult)(hs[-1], t_emb, z_emb, train)
        if h.shape[2] in self.attn_resolutions:
          h = attention(h)
        hs.append(h)
      if level < len(self.ch_mult) - 1:
        h = block(resample='down')(hs[-1], t_emb, z_emb, train)
        if self.progressive_input == 'residual':
          pyramid = PyramidDownsample(h.shape[-1], fir_kernel=self.fir_kernel, dtype=self.dtype)(pyramid)
          pyramid = (pyramid + h) / math.sqrt(2.0) if self.skip_rescale else pyramid + h
          h = pyramid
        hs.append(h)

    h = block()(hs[-1], t_emb, z_emb, train)
    h = attention(h)
    h = block()(h, t_emb, z_emb, train)

    # Up: num_res_blocks + 1 blocks per level, each eating one skip.
    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = block(out_ch=self.nf * self.ch_mult[level])(jnp.concatenate([h, hs.pop()], -1), t_emb, z_emb, train)
      if h.shape[2] in self.attn_resolutions:
        h = attention(h)
      if level > 0:
        h = block(resample='up')(h, t_emb, z_emb, train)

    h = conv(self.num_channels, 3, self.dtype, scale=0.0)(group_norm(h, self.dtype, silu=True))
    h = h.astype(jnp.float32)
    return h if self.not_use_tanh else jnp.tanh(h)
