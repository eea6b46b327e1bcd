"""Builds the network named by `config.model.name`; the only place that reads the config for a model."""
import flax.linen as nn
import jax.numpy as jnp

from ddjax.models import unet

PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def parse_blocks(blocks: str) -> tuple[str, ...]:
  """'res,clsAtn,chnAtn' -> ('res', 'clsAtn', 'chnAtn'); ValueError on an unknown token."""
  tokens = tuple(token.strip() for token in blocks.split(','))
  for token in tokens:
    if token not in unet.BLOCK_TYPES:
      raise ValueError(f'model.blocks: unknown block {token!r} in {blocks!r}; '
                       f'allowed: {", ".join(unet.BLOCK_TYPES)}')
  return tokens


def _validate_unet(config) -> None:
  """Checks in terms of config keys, so a bad config fails here and not as a tracing error."""
  model, image_size = config.model, config.data.image_size
  blocks = parse_blocks(model.blocks)
  for key in ('ch', 'num_levels', 'num_heads', 'attn_resolution'):
    if model[key] < 1:
      raise ValueError(f'model.{key}: must be >= 1, got {model[key]}')
  factor = 2 ** (model.num_levels - 1)
  if image_size % factor:
    raise ValueError(f'data.image_size: {image_size} is not divisible by {factor}; with model.num_levels='
                     f'{model.num_levels} it must be a multiple of 2**(num_levels-1) = {factor}')
  if {'clsAtn', 'atn'} & set(blocks) and model.ch % model.num_heads:
    raise ValueError(f'model.num_heads: {model.num_heads} must divide model.ch={model.ch}')


def _create_unet(config, dtype) -> nn.Module:
  _validate_unet(config)
  model = config.model
  return unet.UNet(
      ch=model.ch,
      ch_mult=model.ch_mult,
      num_levels=model.num_levels,
      blocks=parse_blocks(model.blocks),
      attn_resolution=model.attn_resolution,
      num_heads=model.num_heads,
      dropout=model.dropout,
      t_dim=model.t_dim,
      c_dim=model.c_dim,
      num_classes=config.data.num_classes,
      out_channels=config.data.num_channels * (2 if config.diffusion.variance == 'learned_range' else 1),
      dtype=dtype,
  )


BUILDERS = {'unet': _create_unet}


def create_model(config) -> nn.Module:
  """The network for `config`; params are float32, compute in `config.parallel.precision`."""
  name, precision = config.model.name, config.parallel.precision
  if name not in BUILDERS:
    raise ValueError(f'model.name: unknown model {name!r}; allowed: {", ".join(BUILDERS)}')
  if precision not in PRECISIONS:
    raise ValueError(f'parallel.precision: unknown {precision!r}; allowed: {", ".join(PRECISIONS)}')
  return BUILDERS[name](config, PRECISIONS[precision])
