"""DDGAN's time-conditioned discriminators D(x_{t-1}, t, x_t) -> logit (NVlabs/denoising-diffusion-gan), NHWC.

Both variants: a positional embedding of t through a 2-layer MLP, a 1x1 conv on concat(x_{t-1}, x_t), a stack
of down-sampling conv blocks that each add the time embedding, the minibatch-stddev feature, a 3x3 conv,
LeakyReLU(0.2), a sum over positions and a dense layer to one logit.

'small' (Discriminator_small, CIFAR-10 / StackMNIST) halves the resolution 3 times: 32 -> 4, 64 -> 8 and
8 -> 1, so the 8x8 digits need no change of layout. 'large' (Discriminator_large, 256 px) halves it 6 times.
"""
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from ddjax.models.conv import Conv
from ddjax.models.ncsnpp import dense_init, fir_downsample, positional_embedding

STDDEV_GROUP = 4


def leaky_relu(x):
  return nn.leaky_relu(x, 0.2)


def minibatch_stddev(x, group_size: int = STDDEV_GROUP, eps: float = 1e-8):
  """Appends one channel s = mean_{h,w,c} √(Var_g(x) + eps), Var (biased) over a group of G = min(B, 4).

  Groups are G consecutive examples, and B must be a multiple of G (`check_batch`). The reference's
  view(G, -1, ...) groups b with every b' ≡ b (mod B/G) instead: the same statistic over another partition of
  the batch, but one that changes when the batch is split over devices; consecutive groups stay whole when every
  device's batch is a multiple of G, so 1 and 8 devices compute the same numbers.
  """
  b, height, width, _ = x.shape
  g = min(b, group_size)
  if b % g:
    raise ValueError(f'minibatch stddev: batch {b} is not a multiple of its group size {g}')
  # float32: the variance of bf16 activations that are nearly equal cancels to noise.
  groups = x.astype(jnp.float32).reshape(b // g, g, *x.shape[1:])
  s = jnp.mean(jnp.sqrt(jnp.var(groups, axis=1) + eps), axis=(1, 2, 3))
  s = jnp.repeat(s, g).astype(x.dtype)
  return jnp.concatenate([x, jnp.broadcast_to(s[:, None, None, None], (b, height, width, 1))], axis=-1)


def check_batch(batch: int) -> str | None:
  """None when a per-device batch works with the minibatch stddev, else what is allowed."""
  g = min(batch, STDDEV_GROUP)
  if batch >= 1 and batch % g == 0:
    return None
  return f'a per-device batch of 1-{STDDEV_GROUP} or a multiple of {STDDEV_GROUP} (minibatch-stddev groups)'


class DownBlock(nn.Module):
  """DownConvBlock: h = act(Conv(act(x)) + Dense(t_emb)); [FIR ↓2 of h and x];
  out = (Conv₀(h) + Conv1x1(x)) / √2, Conv₀ starting near zero and the 1x1 skip without bias."""
  features: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb):
    h = Conv(self.features, (3, 3), kernel_init=dense_init(), dtype=self.dtype)(leaky_relu(x))
    h = h + nn.Dense(self.features, kernel_init=dense_init(), dtype=self.dtype)(t_emb)[:, None, None, :]
    h = leaky_relu(h)
    if self.downsample:
      h, x = fir_downsample(h), fir_downsample(x)
    h = Conv(self.features, (3, 3), kernel_init=dense_init(0.0), dtype=self.dtype)(h)
    skip = Conv(self.features, (1, 1), use_bias=False, kernel_init=dense_init(), dtype=self.dtype)(x)
    return (h + skip) / math.sqrt(2.0)


class _Discriminator(nn.Module):
  """(x_prev [B,H,W,C], t int32 [B], x_t [B,H,W,C], labels int [B] or None) -> logits [B] float32.

  Class conditioning (num_classes > 0, not in the paper) is the projection discriminator's (Miyato & Koyama
  2018): logit += <Embed(label), pooled features>. `train` changes nothing (no dropout, no batch
  statistics); it is there so that G and D are called alike. Defaults are the paper's: ngf 64 and t_emb_dim
  256 (train_ddgan.py passes --t_emb_dim, default 256, to both variants).
  """
  ngf: int = 64
  t_emb_dim: int = 256
  num_classes: int = 0
  dtype: Any = jnp.float32
  # (channel multiple of ngf, halves the resolution) per DownBlock; the final conv's init scale.
  layout: ClassVar[tuple[tuple[int, bool], ...]]
  final_init_scale: ClassVar[float]

  @nn.compact
  def __call__(self, x_prev, t, x_t, labels=None, *, train: bool):
    if (labels is None) != (self.num_classes == 0):
      raise ValueError(f'labels must be None exactly when num_classes == 0 (num_classes={self.num_classes})')
    t_emb = nn.Dense(self.t_emb_dim, kernel_init=dense_init(), dtype=self.dtype)(
        positional_embedding(t, self.t_emb_dim))
    t_emb = nn.Dense(self.t_emb_dim, kernel_init=dense_init(), dtype=self.dtype)(leaky_relu(t_emb))
    t_emb = leaky_relu(t_emb)

    h = jnp.concatenate([x_prev, x_t], axis=-1).astype(self.dtype)
    h = Conv(2 * self.ngf, (1, 1), kernel_init=dense_init(), dtype=self.dtype)(h)
    for mult, downsample in self.layout:
      h = DownBlock(mult * self.ngf, downsample, self.dtype)(h, t_emb)

    h = minibatch_stddev(h)
    h = Conv(8 * self.ngf, (3, 3), kernel_init=dense_init(self.final_init_scale), dtype=self.dtype)(h)
    # Summed in float32: up to 32x32 bf16 terms would accumulate their rounding.
    h = jnp.sum(leaky_relu(h).astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(1, kernel_init=dense_init(), dtype=self.dtype)(h)[:, 0]
    if self.num_classes:
      logits = logits + jnp.sum(nn.Embed(self.num_classes, h.shape[-1], dtype=self.dtype)(labels) * h, axis=-1)
    return logits.astype(jnp.float32)


class SmallDiscriminator(_Discriminator):
  """Discriminator_small (≤ 64 px): widths 2, 2, 4, 8, 8 × ngf, halving in the last three blocks."""
  layout = ((2, False), (4, True), (8, True), (8, True))
  final_init_scale = 0.0


class LargeDiscriminator(_Discriminator):
  """Discriminator_large (256 px): widths 2, 4, 8, 8, 8, 8, 8 × ngf, halving in all six blocks."""
  layout = ((4, True), (8, True), (8, True), (8, True), (8, True), (8, True))
  final_init_scale = 1.0


VARIANTS = {'small': SmallDiscriminator, 'large': LargeDiscriminator}


def num_halvings(variant: str) -> int:
  return sum(downsample for _, downsample in VARIANTS[variant].layout)


def check_fits(variant: str, image_size: int) -> str | None:
  """None when `variant` takes images of image_size, else what is allowed.

  Every halving must be exact (a multiple of 2**halvings), which also keeps the last map at least 1x1.
  """
  if variant not in VARIANTS:
    return f'one of {", ".join(VARIANTS)}'
  factor = 2 ** num_halvings(variant)
  if image_size >= factor and image_size % factor == 0:
    return None
  return f'an image size that is a multiple of {factor} for the {variant!r} discriminator'
