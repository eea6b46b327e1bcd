"""The ADM U-Net (NHWC): improved-diffusion's and guided-diffusion's UNetModel, and with layout 'ddpm' the network of
DDPM (Ho et al. 2020) as its TensorFlow code and diffusers' UNet2DModel compute it.

Levels l = 0..L−1 at widths ch·ch_mult[l], the image halved between levels. Down: a 3×3 conv, then per level
num_res_blocks residual blocks (each followed by self-attention where the feature map's width is in
attn_resolutions) and a 2× downsampling; middle: block, attention, block; up: per level num_res_blocks + 1 blocks,
each fed the concatenation with one stored down activation (the stem's, every block's and every downsampling's),
then a 2× upsampling; out: GroupNorm, SiLU, 3×3 conv. The time embedding is an MLP (ch → 4ch → 4ch) of a
sinusoidal embedding of t; a class embedding (4ch) is added to it. Residual branches and the output end in
zero-initialised convolutions, as the reference's, so a fresh network outputs zeros.

The parameter names follow the network's parts (`down_{level}_{block}`, `down_{level}_{block}_attn`,
`downsample_{level}`, `mid_*`, `up_{level}_{block}[_attn]`, `upsample_{level}`), so a state_dict maps onto them key
by key (ddjax/pretrained/adm.py).
"""
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddjax.models import normalization
from ddjax.models.conv import Conv, ConvAndBias, upsampled_conv
from ddjax.models.ncsnpp import positional_embedding
from ddjax.models.unet import timestep_embedding

NUM_GROUPS = 32  # GroupNorm32 / DDPM's group_norm / diffusers' norm_num_groups
# 'adm': improved/guided-diffusion; 'ddpm': DDPM's TensorFlow network (and diffusers' port of its weights).
LAYOUTS = ('adm', 'ddpm')
ATTENTION_ORDERS = ('legacy', 'new')
# GroupNorm ε: torch's default in the ADM code, tf.contrib's group_norm in DDPM's.
EPSILON = {'adm': 1e-5, 'ddpm': 1e-6}
zeros = nn.initializers.zeros


def embed_time(t, dim: int, layout: str):
  """The sinusoidal embedding of (real) t: ADM's [cos, sin] with frequencies 10000^(−i/(dim/2)), or DDPM's
  [sin, cos] with 10000^(−i/(dim/2 − 1))."""
  return timestep_embedding(t, dim) if layout == 'adm' else positional_embedding(t, dim)


class GroupNorm(nn.Module):
  """GroupNorm (32 groups) of x + offset, optionally modulated per example as GN(x)·(1 + s) + b (ADM's
  scale-shift norm), optionally followed by SiLU. The modulation folds into the norm's own affine,
  γ·(1 + s) and β·(1 + s) + b, so it is one normalization.group_norm call (the CPU kernel's, there)."""
  epsilon: float
  silu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, offset=None, modulation=None):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    if modulation is not None:
      s, b = (m.astype(jnp.float32) for m in modulation)
      scale, bias = scale * (1 + s), bias * (1 + s) + b
    return normalization.group_norm(x.astype(jnp.float32), scale, bias, NUM_GROUPS, self.epsilon, self.silu,
                                    offset).astype(self.dtype)


def resample(x, direction: str):
  """Nearest 2× upsampling ('up') or 2×2 average pooling ('down'), NHWC."""
  if direction == 'up':
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
  """h = conv(SiLU(GN(x))); h = conv₀(dropout(SiLU(GN(h + Dense(SiLU(emb)))))); out = skip(x) + h.

  With scale_shift_norm Dense(SiLU(emb)) gives (s, b) and the second norm is GN(h)·(1 + s) + b. `updown` resamples
  h after the first SiLU and x before the skip (guided-diffusion's resblock_updown). skip is a 1×1 conv when the
  width changes, else the identity.
  """
  out_ch: int
  dropout: float
  scale_shift_norm: bool
  epsilon: float
  updown: Literal['none', 'up', 'down'] = 'none'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    norm = lambda name: GroupNorm(self.epsilon, silu=True, dtype=self.dtype, name=name)
    h = norm('norm_in')(x)
    if self.updown != 'none':
      h, x = resample(h, self.updown), resample(x, self.updown)
    h, offset = ConvAndBias(self.out_ch, (3, 3), dtype=self.dtype, name='conv_in')(h)
    cond = nn.Dense(2 * self.out_ch if self.scale_shift_norm else self.out_ch, dtype=self.dtype,
                    name='emb')(nn.silu(emb))
    if self.scale_shift_norm:
      h = norm('norm_out')(h, offset, modulation=jnp.split(cond, 2, axis=-1))
    else:  # GN(h + bias + cond): the sum is the norm's offset
      h = norm('norm_out')(h, offset + cond)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = Conv(self.out_ch, (3, 3), kernel_init=zeros, dtype=self.dtype, name='conv_out')(h)
    if x.shape[-1] != self.out_ch:
      x = Conv(self.out_ch, (1, 1), dtype=self.dtype, name='skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """x + proj₀(softmax(q·kᵀ/√d)·v) over all H·W positions, per head of d channels, q, k, v from GN(x).

  ADM computes q, k, v with one 1×1 layer `qkv` of 3C outputs, laid out (head, q|k|v, d) in the legacy order and
  (q|k|v, head, d) in the new one; DDPM (layout 'ddpm') with three layers `q`, `k`, `v`. Softmax in float32.
  """
  num_heads: int
  order: str
  epsilon: float
  fused_qkv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    heads, d = self.num_heads, c // self.num_heads
    h = GroupNorm(self.epsilon, dtype=self.dtype, name='norm')(x).reshape(b, height * width, c)
    if self.fused_qkv:
      qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(h)
      shape = (heads, 3, d) if self.order == 'legacy' else (3, heads, d)
      qkv = qkv.reshape(b, height * width, *shape)
      q, k, v = (jnp.take(qkv, i, axis=3 if self.order == 'legacy' else 2) for i in range(3))
    else:
      q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(h).reshape(b, height * width, heads, d)
                 for name in ('q', 'k', 'v'))
    logits = jnp.einsum('bthd,bshd->bhts', q, k) / math.sqrt(d)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    h = jnp.einsum('bhts,bshd->bthd', weights, v).reshape(b, height, width, c)
    return x + nn.Dense(c, kernel_init=zeros, dtype=self.dtype, name='proj_out')(h)


# The same blocks under jax.checkpoint (model.remat), saving only their inputs, as unet.REMAT_BLOCKS; ResBlock's
# `train` (argument 3, counting self) is a Python bool, hence static.
REMAT = {ResBlock: nn.remat(ResBlock, static_argnums=(3,)), AttentionBlock: nn.remat(AttentionBlock)}


class ADM(nn.Module):
  """(x_t [B,H,W,C], t int [B], labels int [B] or None) -> [B,H,W,out_channels] float32.

  The network sees t·time_scale (1000/T with improved-diffusion's rescale_timesteps, else 1). attn_resolutions are
  feature-map widths. Heads: num_head_channels channels each, or num_heads per block when that is −1. With
  num_classes > 0 the label embedding has num_classes rows, plus the null class num_classes (classifier-free
  guidance) when null_class. train=True with dropout > 0 needs a 'dropout' rng.
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  out_channels: int
  num_heads: int = 1
  num_head_channels: int = -1
  scale_shift_norm: bool = False
  resblock_updown: bool = False
  attention_order: str = 'legacy'
  dropout: float = 0.0
  time_scale: float = 1.0
  layout: str = 'adm'
  num_classes: int = 0
  null_class: bool = False
  remat: bool = False
  dtype: Any = jnp.float32

  def res_block(self, out_ch, name, updown='none'):
    block = REMAT[ResBlock] if self.remat else ResBlock
    return block(out_ch=out_ch, dropout=self.dropout, scale_shift_norm=self.scale_shift_norm,
                 epsilon=EPSILON[self.layout], updown=updown, dtype=self.dtype, name=name)

  def attention(self, x, name):
    c = x.shape[-1]
    heads = self.num_heads if self.num_head_channels == -1 else c // self.num_head_channels
    block = REMAT[AttentionBlock] if self.remat else AttentionBlock
    return block(num_heads=heads, order=self.attention_order, epsilon=EPSILON[self.layout],
                 fused_qkv=self.layout == 'adm', dtype=self.dtype, name=name)(x)

  def downsample(self, h, emb, train, level):
    """ADM: a 3×3 stride-2 conv padded 1 on each side; DDPM: TF's 'SAME', padded (0, 1); resblock_updown: a
    residual block around 2×2 average pooling."""
    name = f'downsample_{level}'
    if self.resblock_updown:
      return self.res_block(h.shape[-1], name, 'down')(h, emb, train)
    padding = ((1, 1), (1, 1)) if self.layout == 'adm' else ((0, 1), (0, 1))
    return Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=padding, dtype=self.dtype, name=name)(h)

  def upsample(self, h, emb, train, level):
    """Nearest 2× upsampling then a 3×3 conv, or a residual block around it (resblock_updown)."""
    name = f'upsample_{level}'
    if self.resblock_updown:
      return self.res_block(h.shape[-1], name, 'up')(h, emb, train)
    return Conv(h.shape[-1], (3, 3), dtype=self.dtype, conv_general_dilated=upsampled_conv, name=name)(h)

  @nn.compact
  def __call__(self, x_t, t, labels, train: bool = False):
    if (labels is None) != (self.num_classes == 0):
      raise ValueError(f'labels must be None exactly when num_classes == 0 (num_classes={self.num_classes})')
    emb_dim = 4 * self.ch
    emb = embed_time(t.astype(jnp.float32) * self.time_scale, self.ch, self.layout)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name='time_embed_0')(emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name='time_embed_1')(nn.silu(emb))
    if self.num_classes:
      emb = emb + nn.Embed(self.num_classes + self.null_class, emb_dim, dtype=self.dtype, name='label_emb')(labels)

    h = Conv(self.ch * self.ch_mult[0], (3, 3), dtype=self.dtype, name='conv_in')(x_t.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = self.res_block(self.ch * mult, f'down_{level}_{i}')(h, emb, train)
        if h.shape[2] in self.attn_resolutions:
          h = self.attention(h, f'down_{level}_{i}_attn')
        skips.append(h)
      if level < len(self.ch_mult) - 1:
        h = self.downsample(h, emb, train, level)
        skips.append(h)

    h = self.res_block(h.shape[-1], 'mid_0')(h, emb, train)
    h = self.attention(h, 'mid_attn')
    h = self.res_block(h.shape[-1], 'mid_1')(h, emb, train)

    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self.res_block(self.ch * self.ch_mult[level], f'up_{level}_{i}')(h, emb, train)
        if h.shape[2] in self.attn_resolutions:
          h = self.attention(h, f'up_{level}_{i}_attn')
      if level > 0:
        h = self.upsample(h, emb, train, level)

    h = GroupNorm(EPSILON[self.layout], silu=True, dtype=self.dtype, name='norm_out')(h)
    h = Conv(self.out_channels, (3, 3), kernel_init=zeros, dtype=self.dtype, name='conv_out')(h)
    return h.astype(jnp.float32)
