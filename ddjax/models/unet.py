"""The seed's configurable U-Net (NHWC): a comma list of block tokens applied at every level.

Every block maps [B,H,W,C] -> [B,H,W,C]; channel changes happen only in the resamplers and in the projection
after each skip concat, so any token list (with or without `res`) builds. Residual branches end in a
zero-initialised layer, so a fresh residual block is the identity, and the zero-initialised output conv
makes a fresh network output zeros.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ddjax.models.conv import Conv, ConvAndBias, upsampled_conv
from ddjax.models.normalization import GroupNorm

zeros = nn.initializers.zeros


def largest_divisor(n: int, limit: int) -> int:
  """Largest d <= limit that divides n."""
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def group_norm(x, dtype, silu: bool = False, offset=None):
  return GroupNorm(num_groups=largest_divisor(x.shape[-1], 32), dtype=dtype, silu=silu)(x, offset)


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """[cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/(dim/2)), i < dim/2."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA-Net: k = |log2(C)/γ + b/γ|, rounded up to the next odd number."""
  k = int(abs(math.log2(channels) / gamma + b / gamma))
  return k if k % 2 else k + 1


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3x3 (+ time and class projections) -> GN -> SiLU -> dropout -> conv3x3, residual."""
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb, c_emb, train):
    c = x.shape[-1]
    h, conv_bias = ConvAndBias(c, (3, 3), dtype=self.dtype, name='Conv_0')(group_norm(x, self.dtype, silu=True))
    cond = nn.Dense(c, dtype=self.dtype)(nn.silu(t_emb))
    if c_emb is not None:
      cond = cond + nn.Dense(c, dtype=self.dtype)(nn.silu(c_emb))
    # GN(h + bias + cond): the sum is the norm's offset (normalization.group_norm).
    h = group_norm(h, self.dtype, silu=True, offset=conv_bias + cond)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return x + Conv(c, (3, 3), kernel_init=zeros, dtype=self.dtype, name='Conv_1')(h)


class ConvNeXtBlock(nn.Module):
  """Depthwise conv7x7 -> LN -> (+ time projection) -> Dense(4c) -> GELU -> Dense(c), residual."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb, c_emb, train):
    c = x.shape[-1]
    h = Conv(c, (7, 7), feature_group_count=c, dtype=self.dtype)(x)
    h = nn.LayerNorm(dtype=self.dtype)(h)
    h = h + nn.Dense(c, dtype=self.dtype)(nn.silu(t_emb))[:, None, None, :]
    h = nn.gelu(nn.Dense(4 * c, dtype=self.dtype)(h))
    return x + nn.Dense(c, kernel_init=zeros, dtype=self.dtype)(h)


class ClassAttention(nn.Module):
  """Cross-attention from every pixel to the tokens [class_emb, t_emb] (t_emb only when unconditional)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb, c_emb, train):
    b, h, w, c = x.shape
    queries = group_norm(x, self.dtype).reshape(b, h * w, c)
    context = [c_emb, t_emb] if c_emb is not None else [t_emb]
    context = jnp.stack([nn.Dense(c, dtype=self.dtype)(e) for e in context], axis=1)
    out = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, out_kernel_init=zeros)(queries, context)
    return x + out.reshape(b, h, w, c)


class PatchAttention(nn.Module):
  """ViT block over p×p patches, p chosen so there are at most attn_resolution² tokens."""
  num_heads: int
  attn_resolution: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb, c_emb, train):
    b, h, w, c = x.shape
    # p must divide H so that unpatchify restores the exact shape.
    p = largest_divisor(h, max(1, h // self.attn_resolution))
    tokens = Conv(c, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype)(x)
    grid = tokens.shape[1:3]
    tokens = tokens.reshape(b, grid[0] * grid[1], c)
    tokens = tokens + self.param('pos_emb', nn.initializers.normal(0.02), (1, tokens.shape[1], c))
    tokens = tokens + nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype)(
        nn.LayerNorm(dtype=self.dtype)(tokens))
    mlp = nn.gelu(nn.Dense(4 * c, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(tokens)))
    tokens = tokens + nn.Dense(c, dtype=self.dtype)(mlp)
    out = nn.ConvTranspose(c, (p, p), strides=(p, p), padding='VALID', kernel_init=zeros,
                           dtype=self.dtype)(tokens.reshape(b, *grid, c))
    return x + out


class ChannelAttention(nn.Module):
  """ECA-Net: global average pool -> 1D conv over channels (adaptive k) -> sigmoid -> scale channels."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t_emb, c_emb, train):
    k = eca_kernel_size(x.shape[-1])
    pooled = jnp.mean(x, axis=(1, 2))[..., None]  # [B, C, 1]: channels become the 1D conv's length axis
    gate = Conv(1, (k,), use_bias=False, dtype=self.dtype)(pooled)[..., 0]
    return x * nn.sigmoid(gate)[:, None, None, :]


BLOCKS = {'res': ResBlock, 'conv': ConvNeXtBlock, 'clsAtn': ClassAttention, 'atn': PatchAttention,
          'chnAtn': ChannelAttention}
BLOCK_TYPES = tuple(BLOCKS)
# The same blocks under jax.checkpoint, saving only each block's inputs: no policy, as also saving the matmul
# outputs buys few FLOPs for much more memory (docs/performance.md). prevent_cse stays on: outside a scan, XLA would
# otherwise merge the recomputation back into the forward pass. Blocks are called as (self, x, t_emb, c_emb,
# train); `train` is a Python bool, hence static.
REMAT_BLOCKS = {token: nn.remat(block, static_argnums=(4,)) for token, block in BLOCKS.items()}


class UNet(nn.Module):
  """(x_t [B,H,W,C], t int [B], labels int [B] in [0, num_classes] or None) -> [B,H,W,out_channels] f32.

  labels == num_classes is the null class used for classifier-free guidance. With remat every block is
  rematerialised (jax.checkpoint): the backward pass recomputes its activations from its input instead of
  storing them. Parameter names are the same either way, so checkpoints load across the setting.
  """
  ch: int
  ch_mult: int | tuple[int, ...]
  num_levels: int
  blocks: tuple[str, ...]
  attn_resolution: int
  num_heads: int
  dropout: float
  t_dim: int
  c_dim: int
  num_classes: int
  out_channels: int
  dtype: Any = jnp.float32
  remat: bool = False

  def width(self, level: int) -> int:
    """ch·2^(ch_mult·level) for an int ch_mult (the seed's doubling), ch·ch_mult[level] for a per-level tuple
    (DDPM / IDDPM)."""
    if isinstance(self.ch_mult, int):
      return self.ch * 2 ** (self.ch_mult * level)
    return self.ch * self.ch_mult[level]

  def apply_blocks(self, x, t_emb, c_emb, train, where: str):
    options = {
        'res': dict(dropout=self.dropout),
        'clsAtn': dict(num_heads=self.num_heads),
        'atn': dict(num_heads=self.num_heads, attn_resolution=self.attn_resolution),
    }
    blocks = REMAT_BLOCKS if self.remat else BLOCKS
    for i, token in enumerate(self.blocks):
      block = blocks[token](dtype=self.dtype, name=f'{where}_{i}_{token}', **options.get(token, {}))
      x = block(x, t_emb, c_emb, train)
    return x

  @nn.compact
  def __call__(self, x_t, t, labels, train: bool = False):
    if (labels is None) != (self.num_classes == 0):
      raise ValueError(f'labels must be None exactly when num_classes == 0 (num_classes={self.num_classes})')
    t_emb = nn.Dense(self.t_dim, dtype=self.dtype)(timestep_embedding(t, self.t_dim))
    t_emb = nn.Dense(self.t_dim, dtype=self.dtype)(nn.silu(t_emb))
    c_emb = None
    if self.num_classes:
      c_emb = nn.Embed(self.num_classes + 1, self.c_dim, dtype=self.dtype)(labels)

    x = Conv(self.width(0), (3, 3), dtype=self.dtype)(x_t.astype(self.dtype))
    skips = []
    for level in range(self.num_levels):
      x = self.apply_blocks(x, t_emb, c_emb, train, f'down{level}')
      skips.append(x)
      if level < self.num_levels - 1:
        x = Conv(self.width(level + 1), (3, 3), strides=(2, 2), dtype=self.dtype)(x)

    x = self.apply_blocks(x, t_emb, c_emb, train, 'mid')

    for level in reversed(range(self.num_levels)):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = Conv(self.width(level), (1, 1), dtype=self.dtype)(x)
      x = self.apply_blocks(x, t_emb, c_emb, train, f'up{level}')
      if level > 0:  # nearest 2× upsampling, then a 3×3 convolution
        x = Conv(self.width(level - 1), (3, 3), dtype=self.dtype, conv_general_dilated=upsampled_conv)(x)

    x = group_norm(x, self.dtype, silu=True)
    x = Conv(self.out_channels, (3, 3), kernel_init=zeros, dtype=self.dtype)(x)
    return x.astype(jnp.float32)
