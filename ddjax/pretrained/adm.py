"""The ADM U-Net's checkpoints (models/adm.py, model.name='adm'): improved-diffusion's and guided-diffusion's
UNetModel state_dicts (the two name their parameters alike), and diffusers' UNet2DModel in DDPM's layout
(google/ddpm-cifar10-32 and its kind; model.layout='ddpm').

Both key maps walk the network in the order models/adm.py builds it. improved/guided-diffusion keep the down path
in `input_blocks.<k>` (k = 0 the stem, then each res block with its attention at `.1`, and each downsampling), the
middle in `middle_block.{0,1,2}` and the up path in `output_blocks.<k>` (a res block, its attention, and the
level's upsampling after its last block). diffusers keeps them per level: `down_blocks.<level>`,
`up_blocks.<L−1−level>` and `mid_block`, each with `resnets.<i>`, `attentions.<i>` and `downsamplers.0` /
`upsamplers.0`; its attention projections are `to_q`, `to_k`, `to_v`, `to_out.0` (`query`, `key`, `value`,
`proj_attn` in files saved before diffusers 0.15, such as google/ddpm-cifar10-32's .bin).
Layouts: Linear [out, in] -> Dense [in, out]; Conv2d [out, in, kh, kw] -> Conv [kh, kw, in, out]; ADM's attention
projections, Conv1d [out, in, 1] -> Dense [in, out].
"""
import dataclasses
import re
from typing import Callable

from ddjax.gaussian_diffusion import output_channels
from ddjax.pretrained import layouts


def _layer(flax_path: tuple, key: str, transform) -> dict:
  """A Dense or Conv: kernel from `key`.weight through `transform`, bias from `key`.bias."""
  return {(*flax_path, 'kernel'): (f'{key}.weight', transform), (*flax_path, 'bias'): (f'{key}.bias', layouts.same)}


def _norm(flax_path: tuple, key: str) -> dict:
  """A GroupNorm: scale from `key`.weight, bias from `key`.bias."""
  return {(*flax_path, 'scale'): (f'{key}.weight', layouts.same), (*flax_path, 'bias'): (f'{key}.bias', layouts.same)}


def _has(param_shapes, name: str) -> bool:
  return any(path[0] == name for path in param_shapes)


@dataclasses.dataclass(frozen=True)
class Names:
  """A family's names for the parts of a res block and an attention block (models/adm.py's part: file's)."""
  res: dict
  attention: dict  # 'norm', 'proj_out' and either 'qkv' (ADM) or 'q', 'k', 'v' (DDPM)
  attention_transform: Callable


ADM_NAMES = Names(
    res={'norm_in': 'in_layers.0', 'conv_in': 'in_layers.2', 'emb': 'emb_layers.1', 'norm_out': 'out_layers.0',
         'conv_out': 'out_layers.3', 'skip': 'skip_connection'},
    attention={'norm': 'norm', 'qkv': 'qkv', 'proj_out': 'proj_out'}, attention_transform=layouts.conv1d)
DIFFUSERS_RES = {'norm_in': 'norm1', 'conv_in': 'conv1', 'emb': 'time_emb_proj', 'norm_out': 'norm2',
                 'conv_out': 'conv2', 'skip': 'conv_shortcut'}
DIFFUSERS_NAMES = Names(res=DIFFUSERS_RES, attention={'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v',
                                                      'proj_out': 'to_out.0'}, attention_transform=layouts.linear)
DIFFUSERS_OLD_NAMES = Names(res=DIFFUSERS_RES, attention={'norm': 'group_norm', 'q': 'query', 'k': 'key',
                                                          'v': 'value', 'proj_out': 'proj_attn'},
                            attention_transform=layouts.linear)


def _res_block(name: str, key: str, param_shapes, names: Names) -> dict:
  """The res block `name`'s params (those the network has: its skip only when the width changes)."""
  found = {}
  for part, file_part in names.res.items():
    if (name, part, 'bias') in param_shapes:
      path, file_key = (name, part), f'{key}.{file_part}'
      found.update(_norm(path, file_key) if part.startswith('norm') else
                   _layer(path, file_key, layouts.linear if part == 'emb' else layouts.conv))
  return found


def _attention(name: str, key: str, param_shapes, names: Names) -> dict:
  """The attention block `name`'s params in the config's layout: a part the file's family lacks (q of a fused
  qkv, or qkv of separate projections) maps to a key the file does not have, so that the fit check names it."""
  found = _norm((name, 'norm'), f'{key}.{names.attention["norm"]}')
  for part in ('qkv', 'q', 'k', 'v', 'proj_out'):
    if (name, part, 'bias') in param_shapes:
      found.update(_layer((name, part), f'{key}.{names.attention.get(part, part)}', names.attention_transform))
  return found


def _resampling(name: str, key: str, conv: str, param_shapes, names: Names) -> dict:
  """A 2× resampling: a convolution at `key`.`conv`, or a res block at `key` (model.resblock_updown)."""
  if (name, 'kernel') in param_shapes:
    return _layer((name,), f'{key}.{conv}', layouts.conv)
  return _res_block(name, key, param_shapes, names)


def adm_key_map(config, param_shapes, names: Names = ADM_NAMES) -> dict:
  """{flax path: (improved/guided-diffusion key, transform)}."""
  levels, blocks = len(config.model.ch_mult), config.model.num_res_blocks
  found = {**_layer(('time_embed_0',), 'time_embed.0', layouts.linear),
           **_layer(('time_embed_1',), 'time_embed.2', layouts.linear),
           **_layer(('conv_in',), 'input_blocks.0.0', layouts.conv), **_norm(('norm_out',), 'out.0'),
           **_layer(('conv_out',), 'out.2', layouts.conv)}
  if ('label_emb', 'embedding') in param_shapes:
    found[('label_emb', 'embedding')] = ('label_emb.weight', layouts.same)
  k = 0
  for level in range(levels):
    for i in range(blocks):
      k += 1
      found.update(_res_block(f'down_{level}_{i}', f'input_blocks.{k}.0', param_shapes, names))
      if _has(param_shapes, f'down_{level}_{i}_attn'):
        found.update(_attention(f'down_{level}_{i}_attn', f'input_blocks.{k}.1', param_shapes, names))
    if level < levels - 1:
      k += 1
      found.update(_resampling(f'downsample_{level}', f'input_blocks.{k}.0', 'op', param_shapes, names))
  found.update({**_res_block('mid_0', 'middle_block.0', param_shapes, names),
                **_attention('mid_attn', 'middle_block.1', param_shapes, names),
                **_res_block('mid_1', 'middle_block.2', param_shapes, names)})
  k = 0
  for level in reversed(range(levels)):
    for i in range(blocks + 1):
      found.update(_res_block(f'up_{level}_{i}', f'output_blocks.{k}.0', param_shapes, names))
      sub = 0
      if _has(param_shapes, f'up_{level}_{i}_attn'):
        sub = 1
        found.update(_attention(f'up_{level}_{i}_attn', f'output_blocks.{k}.1', param_shapes, names))
      if level > 0 and i == blocks:
        found.update(_resampling(f'upsample_{level}', f'output_blocks.{k}.{sub + 1}', 'conv', param_shapes, names))
      k += 1
  return found


def diffusers_key_map(config, param_shapes, names: Names = DIFFUSERS_NAMES) -> dict:
  """{flax path: (diffusers UNet2DModel key, transform)}."""
  levels, blocks = len(config.model.ch_mult), config.model.num_res_blocks
  found = {**_layer(('time_embed_0',), 'time_embedding.linear_1', layouts.linear),
           **_layer(('time_embed_1',), 'time_embedding.linear_2', layouts.linear),
           **_layer(('conv_in',), 'conv_in', layouts.conv),
           **_norm(('norm_out',), 'conv_norm_out'), **_layer(('conv_out',), 'conv_out', layouts.conv)}
  if ('label_emb', 'embedding') in param_shapes:
    found[('label_emb', 'embedding')] = ('class_embedding.weight', layouts.same)
  for direction, count, prefix in (('down', blocks, 'down_blocks'), ('up', blocks + 1, 'up_blocks')):
    for level in range(levels):
      key = f'{prefix}.{level if direction == "down" else levels - 1 - level}'
      for i in range(count):
        found.update(_res_block(f'{direction}_{level}_{i}', f'{key}.resnets.{i}', param_shapes, names))
        if _has(param_shapes, f'{direction}_{level}_{i}_attn'):
          found.update(_attention(f'{direction}_{level}_{i}_attn', f'{key}.attentions.{i}', param_shapes, names))
      resampling = f'{direction}sample_{level}'
      if _has(param_shapes, resampling):
        found.update(_resampling(resampling, f'{key}.{direction}samplers.0', 'conv', param_shapes, names))
  found.update({**_res_block('mid_0', 'mid_block.resnets.0', param_shapes, names),
                **_attention('mid_attn', 'mid_block.attentions.0', param_shapes, names),
                **_res_block('mid_1', 'mid_block.resnets.1', param_shapes, names)})
  return found


# ----------------------------------------------------------------------------------------------------------------
# What a file's shapes say about the network it holds
# ----------------------------------------------------------------------------------------------------------------

def _indices(shapes, pattern: str) -> list[int]:
  """The distinct integers captured by `pattern` (a regex with one group) over the file's keys, sorted."""
  return sorted({int(m[1]) for key in shapes if (m := re.match(pattern, key))})


def adm_architecture(shapes: dict) -> dict:
  """The network of an improved/guided-diffusion state_dict, from its {key: shape}: an up level ends in a block
  with an upsampling (a conv, or a res block) after the res block and its attention, so there are L·(B + 1) output
  blocks of which L − 1 upsample."""
  outputs = _indices(shapes, r'output_blocks\.(\d+)\.')
  upsampling = [k for k in outputs if any(re.match(rf'output_blocks\.{k}\.[12]\.(conv|in_layers)\.', key)
                                          for key in shapes)]
  levels = len(upsampling) + 1
  per_level = len(outputs) // levels
  ch = shapes['time_embed.0.weight'][1]
  level_blocks = lambda level: range((levels - 1 - level) * per_level, (levels - level) * per_level)
  emb, out = 'input_blocks.1.0.emb_layers.1.weight', 'input_blocks.1.0.out_layers.3.weight'  # the first res block
  return {
      'layout': 'adm', 'ch': ch, 'num_res_blocks': per_level - 1,
      'ch_mult': tuple(shapes[f'output_blocks.{level_blocks(level)[0]}.0.out_layers.3.weight'][0] // ch
                       for level in range(levels)),
      'attn_levels': tuple(level for level in range(levels)
                           if any(f'output_blocks.{k}.1.qkv.weight' in shapes for k in level_blocks(level))),
      'in_channels': shapes['input_blocks.0.0.weight'][1], 'out_channels': shapes['out.2.weight'][0],
      'label_rows': shapes.get('label_emb.weight', (0,))[0],
      'scale_shift_norm': shapes[emb][0] == 2 * shapes[out][0],
      'resblock_updown': levels > 1 and not any(key.endswith('.op.weight') for key in shapes),
  }


def diffusers_architecture(shapes: dict) -> dict:
  """The network of a diffusers UNet2DModel state_dict, from its {key: shape}."""
  levels = len(_indices(shapes, r'down_blocks\.(\d+)\.'))
  ch = shapes['time_embedding.linear_1.weight'][1]
  return {
      'layout': 'ddpm', 'ch': ch, 'num_res_blocks': len(_indices(shapes, r'down_blocks\.0\.resnets\.(\d+)\.')),
      'ch_mult': tuple(shapes[f'down_blocks.{level}.resnets.0.conv1.weight'][0] // ch for level in range(levels)),
      'attn_levels': tuple(level for level in range(levels)
                           if any(key.startswith(f'down_blocks.{level}.attentions.') for key in shapes)),
      'in_channels': shapes['conv_in.weight'][1], 'out_channels': shapes['conv_out.weight'][0],
      'label_rows': shapes.get('class_embedding.weight', (0,))[0],
      'scale_shift_norm': False, 'resblock_updown': False,
  }


def differences(found: dict, config) -> str | None:
  """The config keys whose values differ from the network `found` in a file, as one phrase each: 'the file has
  <what>; <key>=<value>'."""
  model, data = config.model, config.data
  size = data.image_size
  label_rows = data.num_classes + (config.train.p_uncond > 0) if data.num_classes else 0
  out = output_channels(data.num_channels, config.diffusion.variance)
  attn = tuple(size // 2 ** level for level in found['attn_levels'])
  checks = [
      (found['layout'] == model.layout, {'adm': "improved/guided-diffusion's network", 'ddpm': "DDPM's network "
                                         "(diffusers' layout)"}[found['layout']], f'model.layout={model.layout!r}'),
      (found['ch'] == model.ch, f'base width {found["ch"]}', f'model.ch={model.ch}'),
      (found['ch_mult'] == tuple(model.ch_mult), f'widths ch × {found["ch_mult"]}',
       f'model.ch_mult={tuple(model.ch_mult)}'),
      (found['num_res_blocks'] == model.num_res_blocks, f'{found["num_res_blocks"]} res blocks per level',
       f'model.num_res_blocks={model.num_res_blocks}'),
      (set(attn) == set(model.attn_resolutions), f'attention at widths {attn} (at {size} px)',
       f'model.attn_resolutions={tuple(model.attn_resolutions)}'),
      (found['in_channels'] == data.num_channels, f'{found["in_channels"]}-channel inputs',
       f'data.num_channels={data.num_channels}'),
      (found['out_channels'] == out, f'{found["out_channels"]} output channels '
       f'({"a learned variance" if found["out_channels"] == 2 * found["in_channels"] else "a fixed variance"})',
       f'diffusion.variance={config.diffusion.variance!r}'),
      (found['label_rows'] == label_rows, f'{found["label_rows"]} class embeddings' if found['label_rows'] else
       'no class embedding', f'data.num_classes={data.num_classes}, train.p_uncond={config.train.p_uncond} '
       f'({label_rows} rows: the classes, and a null class when train.p_uncond > 0)'),
      (found['scale_shift_norm'] == model.scale_shift_norm,
       f'{"" if found["scale_shift_norm"] else "no "}scale-shift norm',
       f'model.scale_shift_norm={model.scale_shift_norm}'),
      (found['resblock_updown'] == model.resblock_updown,
       f'{"res blocks" if found["resblock_updown"] else "convolutions"} for resampling',
       f'model.resblock_updown={model.resblock_updown}'),
  ]
  phrases = [f'the file has {what}; {setting}' for same, what, setting in checks if not same]
  return '; '.join(phrases) or None


# ----------------------------------------------------------------------------------------------------------------
# The converters
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Converter:
  """A checkpoint family (ddjax/pretrained/__init__.py): its files have all of `signature`'s keys and none of
  `excludes`'s (key suffixes); its key map and its reading of a file's architecture."""
  name: str
  signature: tuple[str, ...]
  key_map_fn: Callable
  names: Names
  architecture: Callable
  excludes: tuple[str, ...] = ()

  def accepts(self, keys: set, config) -> bool:
    return (config.model.name == 'adm' and all(key in keys for key in self.signature)
            and not any(key.endswith(suffix) for key in keys for suffix in self.excludes))

  def key_map(self, config, param_shapes) -> dict:
    return self.key_map_fn(config, param_shapes, self.names)

  def ignored(self, key: str) -> bool:
    del key
    return False  # these families keep no buffers in their state_dicts

  def hint(self, shapes: dict, config) -> str | None:
    try:
      found = self.architecture(shapes)
    except (KeyError, ZeroDivisionError, IndexError):  # a file too far off to read its architecture
      return None
    return differences(found, config)


CONVERTERS = (
    Converter("improved-diffusion / guided-diffusion UNetModel, model.name='adm'",
              ('time_embed.0.weight', 'input_blocks.0.0.weight', 'out.2.weight'), adm_key_map, ADM_NAMES,
              adm_architecture),
    Converter("diffusers UNet2DModel (DDPM's network), model.name='adm'",
              ('time_embedding.linear_1.weight', 'conv_in.weight', 'conv_out.weight'), diffusers_key_map,
              DIFFUSERS_NAMES, diffusers_architecture, excludes=('.query.weight',)),
    Converter("diffusers UNet2DModel (DDPM's network, attention named query/key/value), model.name='adm'",
              ('time_embedding.linear_1.weight', 'conv_in.weight', 'conv_out.weight'), diffusers_key_map,
              DIFFUSERS_OLD_NAMES, diffusers_architecture, excludes=('.to_q.weight',)),
)
