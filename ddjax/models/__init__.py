"""Builds the network named by `config.model.name`; the only place that reads the config for a model."""
import flax.linen as nn
import jax.numpy as jnp

from ddjax.diffusion import output_channels
from ddjax.models import unet
from ddjax.validation import check, check_choice, fail

PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def parse_blocks(blocks: str) -> tuple[str, ...]:
  """'res,clsAtn,chnAtn' -> ('res', 'clsAtn', 'chnAtn'); ConfigError on an unknown token."""
  tokens = tuple(token.strip() for token in blocks.split(','))
  for token in tokens:
    if token not in unet.BLOCK_TYPES:
      fail('model.blocks', blocks, f'a comma list of {", ".join(unet.BLOCK_TYPES)} (unknown block {token!r})')
  return tokens


def _validate_unet(config) -> None:
  """Checks in terms of config keys, so a bad config fails here and not as a tracing error."""
  model, image_size = config.model, config.data.image_size
  blocks = parse_blocks(model.blocks)
  for key in ('ch', 'num_levels', 'num_heads', 'attn_resolution'):
    check(model[key] >= 1, f'model.{key}', model[key], 'an integer >= 1')
  factor = 2 ** (model.num_levels - 1)
  check(image_size % factor == 0, 'data.image_size', image_size,
        f'a multiple of 2**(model.num_levels-1) = {factor} with model.num_levels={model.num_levels}')
  if {'clsAtn', 'atn'} & set(blocks):
    check(model.ch % model.num_heads == 0, 'model.num_heads', model.num_heads,
          f'a divisor of model.ch={model.ch} (attention heads split every level\'s channels)')


def _create_unet(config, dtype) -> nn.Module:
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
      out_channels=output_channels(config.data.num_channels, config.diffusion.variance),
      dtype=dtype,
      remat=model.remat,
  )


# model.name -> (validate(config), build(config, dtype))
MODELS = {'unet': (_validate_unet, _create_unet)}


def validate_model(config) -> None:
  """The model keys of `config`, checked without building anything."""
  check_choice('model.name', config.model.name, MODELS)
  check_choice('parallel.precision', config.parallel.precision, PRECISIONS)
  MODELS[config.model.name][0](config)


def create_model(config) -> nn.Module:
  """The network for `config`; params are float32, compute in `config.parallel.precision`."""
  validate_model(config)
  return MODELS[config.model.name][1](config, PRECISIONS[config.parallel.precision])
