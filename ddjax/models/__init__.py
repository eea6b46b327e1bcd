"""Builds the network named by `config.model.name`; the only place that reads the config for a model."""
import flax.linen as nn
import jax.numpy as jnp

from ddjax.gaussian_diffusion import output_channels
from ddjax.models import adm, discriminator, ncsnpp, unet
from ddjax.validation import check, check_choice, check_types, fail

PRECISIONS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def parse_blocks(blocks: str) -> tuple[str, ...]:
  """'res,clsAtn,chnAtn' -> ('res', 'clsAtn', 'chnAtn'); ConfigError on an unknown token."""
  tokens = tuple(token.strip() for token in blocks.split(','))
  for token in tokens:
    if token not in unet.BLOCK_TYPES:
      fail('model.blocks', blocks, f'a comma list of {", ".join(unet.BLOCK_TYPES)} (unknown block {token!r})')
  return tokens


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _validate_unet(config) -> None:
  """Checks in terms of config keys, so a bad config fails here and not as a tracing error."""
  check_types(config, {'an int': ((int,), 'model.t_dim model.c_dim')})
  model, image_size = config.model, config.data.image_size
  blocks = parse_blocks(model.blocks)
  for key in ('ch', 'num_levels', 'num_heads', 'attn_resolution', 't_dim', 'c_dim'):
    check(model[key] >= 1, f'model.{key}', model[key], 'an integer >= 1')
  # A tuple must restate model.num_levels rather than define it, so no key is silently ignored.
  mult = model.ch_mult
  check((_is_int(mult) and mult >= 0) or (isinstance(mult, (tuple, list)) and len(mult) == model.num_levels
                                          and all(_is_int(m) and m >= 1 for m in mult)),
        'model.ch_mult', mult, f'an int >= 0 (widths ch*2**(ch_mult*level)) or a tuple of '
        f'model.num_levels={model.num_levels} ints >= 1 (widths ch*ch_mult[level])')
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
      ch_mult=model.ch_mult if _is_int(model.ch_mult) else tuple(model.ch_mult),
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


def _validate_ncsnpp(config) -> None:
  model, image_size = config.model, config.data.image_size
  check(len(model.ch_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in model.ch_mult), 'model.ch_mult',
        model.ch_mult, 'a non-empty tuple of ints >= 1 (the width of each level as a multiple of model.ch)')
  check(ncsnpp.num_resolutions_ok(image_size, model.ch_mult), 'data.image_size', image_size,
        f'a multiple of 2**(len(model.ch_mult)-1) = {2 ** (len(model.ch_mult) - 1)}, which '
        f'model.ch_mult={tuple(model.ch_mult)} halves')
  for key in ('ch', 'num_res_blocks'):
    check(model[key] >= 1, f'model.{key}', model[key], 'an integer >= 1')
  check(all(isinstance(r, int) and r >= 1 for r in model.attn_resolutions), 'model.attn_resolutions',
        model.attn_resolutions, 'a tuple of feature-map widths (ints >= 1)')
  gan = config.gan
  fits = discriminator.check_fits(gan.discriminator, image_size)
  check(fits is None, 'gan.discriminator', gan.discriminator, fits)


def _create_ncsnpp(config, dtype) -> nn.Module:
  model, gan = config.model, config.gan
  return ncsnpp.NCSNpp(
      nf=model.ch,
      ch_mult=tuple(model.ch_mult),
      num_res_blocks=model.num_res_blocks,
      attn_resolutions=tuple(model.attn_resolutions),
      dropout=model.dropout,
      num_channels=config.data.num_channels,
      nz=gan.nz,
      z_emb_dim=gan.z_emb_dim,
      n_mlp=gan.n_mlp,
      not_use_tanh=model.not_use_tanh,
      num_classes=config.data.num_classes,
      dtype=dtype,
  )


# {what the message says is allowed: (Python types, keys)} of the ADM network's keys (validation.check_types).
_ADM_TYPES = {
    'an int': ((int,), 'model.ch model.num_res_blocks model.num_heads model.num_head_channels'),
    'a tuple of ints': ((tuple, list), 'model.ch_mult model.attn_resolutions'),
    'True or False': ((bool,), 'model.scale_shift_norm model.resblock_updown model.rescale_timesteps'),
    'a string': ((str,), 'model.attention_order model.layout'),
}


def _validate_adm(config) -> None:
  """The ADM U-Net's keys in config terms: the image halves len(ch_mult)-1 times, every width splits into
  GroupNorm's 32 groups and into whole heads, attention sits at feature-map widths the network has."""
  check_types(config, _ADM_TYPES)
  model, image_size = config.model, config.data.image_size
  check_choice('model.layout', model.layout, adm.LAYOUTS)
  check_choice('model.attention_order', model.attention_order, adm.ATTENTION_ORDERS)
  check(len(model.ch_mult) >= 1 and all(_is_int(m) and m >= 1 for m in model.ch_mult), 'model.ch_mult',
        model.ch_mult, 'a non-empty tuple of ints >= 1 (the width of each level as a multiple of model.ch)')
  for key in ('ch', 'num_res_blocks', 'num_heads'):
    check(model[key] >= 1, f'model.{key}', model[key], 'an integer >= 1')
  check(model.num_head_channels == -1 or model.num_head_channels >= 1, 'model.num_head_channels',
        model.num_head_channels, '-1 (heads by count: model.num_heads) or channels per head >= 1')
  levels = len(model.ch_mult)
  factor = 2 ** (levels - 1)
  check(image_size % factor == 0, 'data.image_size', image_size,
        f'a multiple of 2**(len(model.ch_mult)-1) = {factor} with model.ch_mult={tuple(model.ch_mult)}')
  widths = {image_size // 2 ** level: model.ch * mult for level, mult in enumerate(model.ch_mult)}
  check(all(_is_int(r) and r in widths for r in model.attn_resolutions), 'model.attn_resolutions',
        model.attn_resolutions, f'a tuple of feature-map widths of this network: {tuple(widths)}')
  check(all(c % adm.NUM_GROUPS == 0 for c in widths.values()), 'model.ch', model.ch,
        f'a width whose every level (model.ch * model.ch_mult={tuple(model.ch_mult)}) is a multiple of '
        f'{adm.NUM_GROUPS} (GroupNorm groups)')
  # attention at the chosen widths and in the middle block, at the deepest level
  attended = {widths[r] for r in model.attn_resolutions} | {widths[image_size // factor]}
  if model.num_head_channels == -1:
    check(all(c % model.num_heads == 0 for c in attended), 'model.num_heads', model.num_heads,
          f'a divisor of every attention width {sorted(attended)}')
  else:
    check(all(c % model.num_head_channels == 0 for c in attended), 'model.num_head_channels',
          model.num_head_channels, f'-1 or a divisor of every attention width {sorted(attended)}')


def _create_adm(config, dtype) -> nn.Module:
  """The null class (row num_classes of the label embedding) exists exactly when training drops labels
  (train.p_uncond > 0), as released class-conditional ADM checkpoints have none; guidance without it is refused by
  the diffusion method's checks."""
  model, diffusion = config.model, config.diffusion
  return adm.ADM(
      ch=model.ch,
      ch_mult=tuple(model.ch_mult),
      num_res_blocks=model.num_res_blocks,
      attn_resolutions=tuple(model.attn_resolutions),
      out_channels=output_channels(config.data.num_channels, diffusion.variance),
      num_heads=model.num_heads,
      num_head_channels=model.num_head_channels,
      scale_shift_norm=model.scale_shift_norm,
      resblock_updown=model.resblock_updown,
      attention_order=model.attention_order,
      dropout=model.dropout,
      time_scale=1000 / diffusion.num_timesteps if model.rescale_timesteps else 1.0,
      layout=model.layout,
      num_classes=config.data.num_classes,
      null_class=config.train.p_uncond > 0,
      remat=model.remat,
      dtype=dtype,
  )


# model.name -> (validate(config), build(config, dtype))
MODELS = {'unet': (_validate_unet, _create_unet), 'adm': (_validate_adm, _create_adm),
          'ncsnpp': (_validate_ncsnpp, _create_ncsnpp)}


def validate_model(config) -> None:
  """The model keys of `config`, checked without building anything."""
  check_choice('model.name', config.model.name, MODELS)
  check_choice('parallel.precision', config.parallel.precision, PRECISIONS)
  MODELS[config.model.name][0](config)


def create_model(config) -> nn.Module:
  """The network for `config`; params are float32, compute in `config.parallel.precision`."""
  validate_model(config)
  return MODELS[config.model.name][1](config, PRECISIONS[config.parallel.precision])


def create_discriminator(config) -> nn.Module:
  """DDGAN's time-conditioned discriminator `gan.discriminator` ('small' up to 64 px, 'large' for 256 px)."""
  validate_model(config)
  gan = config.gan
  return discriminator.VARIANTS[gan.discriminator](ngf=gan.d_ch, t_emb_dim=gan.t_emb_dim,
                                                   num_classes=config.data.num_classes,
                                                   dtype=PRECISIONS[config.parallel.precision])
