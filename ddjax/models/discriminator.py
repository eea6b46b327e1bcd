"""DDGAN's time-conditioned discriminators D(x_{t-1}, t, x_t) -> logit (NVlabs/denoising-diffusion-gan), NHWC.

Both variants: a positional embedding of t through a 2-layer MLP, a 1x1 conv on concat(x_{t-1}, x_t), a stack
of conv blocks that each add the time embedding, the minibatch-stddev feature, a 3x3 conv, LeakyReLU(0.2), a sum
over positions and a dense layer to one logit.

'small' (Discriminator_small, CIFAR-10 / StackMNIST) has 4 blocks, the last 3 of which halve the map in the
reference; 'large' (Discriminator_large, 256 px) has 6, all halving. The reference halves whatever it is given,
which is right at the sizes it was built for (32 -> 4 and 256 -> 4) and degenerate below them: at 8 px the small
one ends on a 1x1 map, where the last FIR halving keeps 9/64 of each value and the rest is zero padding, the 3x3
convs and the minibatch stddev see one position, and D keeps its logits on real pairs barely apart
(docs/ddgan.md). So the layout is chosen by the image size (`halvings`): a block halves
when the reference's block does, the map is even and its half is still at least `min_final_size` (4) wide. At
32 px and above both variants are the reference's layout exactly (the last map is 4x4 at 32 and 256 px, 8x8 at
64), and every size has the same blocks and so the same parameters: only where the map stops halving changes.
"""
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from ddjax.models.conv import Conv
from ddjax.models.ncsnpp import dense_init, fir_downsample, positional_embedding

STDDEV_GROUP = 4
MIN_FINAL_SIZE = 4  # the smallest map a block halves down to (docs/ddgan.md: measured against 2 and 1)


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
  out = (Conv₀(h) + Conv1x1(x)) / √2, Conv₀ starting near zero (unless `zero_init` is False) and the 1x1 skip
  without bias."""
  features: int
  downsample: bool
  zero_init: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb):
    h = Conv(self.features, (3, 3), kernel_init=dense_init(), dtype=self.dtype)(leaky_relu(x))
    h = h + nn.Dense(self.features, kernel_init=dense_init(), dtype=self.dtype)(t_emb)[:, None, None, :]
    h = leaky_relu(h)
    if self.downsample:
      h, x = fir_downsample(h), fir_downsample(x)
    h = Conv(self.features, (3, 3), kernel_init=dense_init(0.0 if self.zero_init else 1.0), dtype=self.dtype)(h)
    skip = Conv(self.features, (1, 1), use_bias=False, kernel_init=dense_init(), dtype=self.dtype)(x)
    return (h + skip) / math.sqrt(2.0)


class _Discriminator(nn.Module):
  """(x_prev [B,H,W,C], t int32 [B], x_t [B,H,W,C], labels int [B] or None) -> logits [B] float32.

  Class conditioning (num_classes > 0, not in the paper) is the projection discriminator's (Miyato & Koyama
  2018): logit += <Embed(label), pooled features>. `train` changes nothing (no dropout, no batch
  statistics); it is there so that G and D are called alike. Defaults are the paper's: ngf 64 and t_emb_dim
  256 (train_ddgan.py passes --t_emb_dim, default 256, to both variants). `min_final_size` is the rule's
  floor (`halvings`); 1 gives the reference's layout at every size. `zero_init` is the reference's
  initialisation: every block's second conv (and the small one's final conv) at scale 1e-10, so that a fresh D is
  a constant over a linear skip path; False starts them at scale 1 as the other convs.
  """
  ngf: int = 64
  t_emb_dim: int = 256
  num_classes: int = 0
  min_final_size: int = MIN_FINAL_SIZE
  zero_init: bool = True
  dtype: Any = jnp.float32
  # (channel multiple of ngf, halves the map in the reference) per DownBlock; the final conv's init scale.
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
    downsamples = halvings(self.layout, h.shape[1], min_final_size=self.min_final_size)
    for (mult, _), downsample in zip(self.layout, downsamples):
      h = DownBlock(mult * self.ngf, downsample, self.zero_init, self.dtype)(h, t_emb)

    h = minibatch_stddev(h)
    final_scale = self.final_init_scale if self.zero_init else 1.0
    h = Conv(8 * self.ngf, (3, 3), kernel_init=dense_init(final_scale), dtype=self.dtype)(h)
    # Summed in float32: up to 32x32 bf16 terms would accumulate their rounding.
    h = jnp.sum(leaky_relu(h).astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(1, kernel_init=dense_init(), dtype=self.dtype)(h)[:, 0]
    if self.num_classes:
      logits = logits + jnp.sum(nn.Embed(self.num_classes, h.shape[-1], dtype=self.dtype)(labels) * h, axis=-1)
    return logits.astype(jnp.float32)


class SmallDiscriminator(_Discriminator):
  """Discriminator_small (≤ 64 px): widths 2, 2, 4, 8, 8 × ngf; the last three blocks halve (`halvings`)."""
  layout = ((2, False), (4, True), (8, True), (8, True))
  final_init_scale = 0.0


class LargeDiscriminator(_Discriminator):
  """Discriminator_large (256 px): widths 2, 4, 8, 8, 8, 8, 8 × ngf; all six blocks halve (`halvings`)."""
  layout = ((4, True), (8, True), (8, True), (8, True), (8, True), (8, True))
  final_init_scale = 1.0


VARIANTS = {'small': SmallDiscriminator, 'large': LargeDiscriminator}


def halvings(layout, image_size: int, *, min_final_size: int = MIN_FINAL_SIZE) -> tuple[bool, ...]:
  """Which blocks of `layout` halve a square map of image_size: block i halves when the reference's block i
  does, the map is even and its half is ≥ min_final_size. Small: 8 px -> 4 (one halving), 16 -> 4, 32 -> 4
  (the reference's three), 64 -> 8; large: 256 -> 4 (the reference's six), 64 -> 4, 8 -> 4."""
  size, out = image_size, []
  for _, reference_halves in layout:
    halves = reference_halves and size % 2 == 0 and size // 2 >= min_final_size
    size = size // 2 if halves else size
    out.append(halves)
  return tuple(out)


def final_size(variant: str, image_size: int, *, min_final_size: int = MIN_FINAL_SIZE) -> int:
  """The side of the last feature map (the one the minibatch stddev and the final conv see)."""
  return image_size // 2 ** sum(halvings(VARIANTS[variant].layout, image_size, min_final_size=min_final_size))


def check_fits(variant: str, image_size: int) -> str | None:
  """None when `variant` is a discriminator, else what is allowed: any image size fits, as `halvings` stops
  halving where the map would be odd or below MIN_FINAL_SIZE."""
  if variant not in VARIANTS:
    return f'one of {", ".join(VARIANTS)}'
  return None
