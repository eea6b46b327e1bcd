"""NVlabs' DDGAN generators (NVlabs/denoising-diffusion-gan: `netG_<epoch>.pth`, or the `netG_dict` of its
content.pth) as ddjax's NCSN++ (models/ncsnpp.py, model.name='ncsnpp').

The reference keeps its layers in one list, `all_modules.<i>`, in the order its forward pass uses them, and its
latent mapping in `z_transform.<j>` (PixelNorm, then Linear and SiLU in turn: the Linears at odd j). Flax names
ddjax's layers by creation order (ResBlock_k, AttnBlock_k, PyramidDownsample_k), which follows the same forward
pass, so one walk over the config's architecture (`layout`) pairs them. Layouts: Linear [out, in] -> kernel
[in, out]; Conv2d [out, in, kh, kw] -> kernel [kh, kw, in, out]; NIN's W is [in, out] already.
"""
import collections

from ddjax.pretrained import layouts


def _dense(name: str, flax_path: tuple = (), transform=layouts.linear) -> dict:
  """A layer's kernel and bias from the reference's `<name>.weight` and `<name>.bias`."""
  return {(*flax_path, 'kernel'): (f'{name}.weight', transform), (*flax_path, 'bias'): (f'{name}.bias', layouts.same)}


# ddjax layer kind -> {its param path: (the rest of the reference's key after the layer's, transform)}.
PARAMS = {
    'Dense': _dense(''),
    'Conv': _dense('', transform=layouts.conv),
    'GroupNorm': {('scale',): ('.weight', layouts.same), ('bias',): ('.bias', layouts.same)},
    'ResBlock': {**_dense('.GroupNorm_0.style', ('AdaGroupNorm_0', 'Dense_0')),
                 **_dense('.GroupNorm_1.style', ('AdaGroupNorm_1', 'Dense_0')),
                 **_dense('.Dense_0', ('Dense_0',)),
                 **{key: value for name in ('Conv_0', 'Conv_1', 'Conv_2')
                    for key, value in _dense(f'.{name}', (name,), layouts.conv).items()}},
    'AttnBlock': {('GroupNorm_0', 'scale'): ('.GroupNorm_0.weight', layouts.same),
                  ('GroupNorm_0', 'bias'): ('.GroupNorm_0.bias', layouts.same),
                  **{(f'Dense_{i}', name): (f'.NIN_{i}.{short}', layouts.same) for i in range(4)
                     for name, short in (('kernel', 'W'), ('bias', 'b'))}},
    'PyramidDownsample': _dense('.Conv2d_0', ('Conv_0',), layouts.conv),
}


def layout(config) -> list[tuple[str, str]]:
  """[(kind, ddjax layer name)] in the order of the reference's all_modules: the two time-embedding Linears, the
  input conv, per level num_res_blocks blocks (each followed by attention at attn_resolutions) and, but for the
  last level, a down block and the input pyramid's conv; the middle (block, attention, block); per level upwards
  num_res_blocks + 1 blocks, attention, and an up block but for the first level; the output GroupNorm and conv."""
  model, size = config.model, config.data.image_size
  counts = collections.Counter()

  def layer(kind):
    counts[kind] += 1
    return kind, f'{kind}_{counts[kind] - 1}'

  levels, blocks, attention = len(model.ch_mult), model.num_res_blocks, set(model.attn_resolutions)
  layers = [('Dense', 'time_0'), ('Dense', 'time_1'), layer('Conv')]
  for level in range(levels):
    for _ in range(blocks):
      layers += [layer('ResBlock')] + ([layer('AttnBlock')] if size >> level in attention else [])
    if level < levels - 1:
      layers += [layer('ResBlock'), layer('PyramidDownsample')]
  layers += [layer('ResBlock'), layer('AttnBlock'), layer('ResBlock')]
  for level in reversed(range(levels)):
    layers += [layer('ResBlock') for _ in range(blocks + 1)]
    layers += [layer('AttnBlock')] if size >> level in attention else []
    layers += [layer('ResBlock')] if level > 0 else []
  return layers + [layer('GroupNorm'), layer('Conv')]


class DDGANGenerator:
  """The converter of NVlabs' NCSN++ generators with AdaGN (see the module docstring)."""
  name = "NVlabs DDGAN generator, model.name='ncsnpp'"

  def accepts(self, keys: set[str], config) -> bool:
    return config.model.name == 'ncsnpp' and any(k.startswith('z_transform.') for k in keys) and any(
        k.startswith('all_modules.') for k in keys)

  def key_map(self, config, param_shapes: dict) -> dict:
    """{flax path: (key, transform)} for every parameter of the config's NCSN++ that the reference has (not the
    class embedding of a class-conditional ddjax generator: the reference is unconditional)."""
    prefixes = {name: (f'all_modules.{index}', kind) for index, (kind, name) in enumerate(layout(config))}
    prefixes.update({f'mapping_{j}': (f'z_transform.{2 * j + 1}', 'Dense') for j in range(config.gan.n_mlp + 1)})
    key_map = {}
    for path in param_shapes:
      prefix, kind = prefixes.get(path[0], (None, None))
      if kind is not None and path[1:] in PARAMS[kind]:
        key, transform = PARAMS[kind][path[1:]]
        key_map[path] = (prefix + key, transform)
    return key_map

  def ignored(self, key: str) -> bool:
    del key
    return False  # the generator's state_dict holds parameters only

  def hint(self, shapes: dict, config) -> str | None:
    """'the file has <what>; <key>=<value>' for each flag the shapes reveal that differs from the config."""
    found = architecture(shapes, config.data.image_size)
    if config.data.num_classes:
      found['data.num_classes'] = 0
    words = {'model.ch': 'nf {}', 'model.ch_mult': 'ch_mult {}', 'model.num_res_blocks': '{} res blocks per level',
             'model.attn_resolutions': f'attention at widths {{}} (of data.image_size={config.data.image_size})',
             'gan.nz': 'nz {}', 'gan.z_emb_dim': 'z_emb_dim {}', 'gan.n_mlp': 'n_mlp {}',
             'data.num_channels': '{} image channels', 'data.num_classes': 'no classes (unconditional)'}
    differing = []
    for key, value in found.items():
      section, name = key.split('.')
      current = config[section][name]
      if (tuple(current) if isinstance(current, (tuple, list)) else current) != value:
        differing.append(f'the file has {words[key].format(value)}; {key}={current!r}')
    return '; '.join(differing) or None


def architecture(shapes: dict, image_size: int) -> dict:
  """{config key: value} of what a reference generator's {key: shape} reveals: the latent mapping's sizes, the
  width, the image channels, blocks per level, the levels' widths and attention. With L levels (L − 1 pyramid
  convs) and B blocks per level the layer list holds L·(2B + 3) AdaGN blocks: B down, 1 down-sampling but on the
  last level, 2 middle, B + 1 up, 1 up-sampling but on the first. What an unusual file does not reveal is left
  out."""
  found = {}
  mapping = sorted(int(k.split('.')[1]) for k in shapes if k.startswith('z_transform.') and k.endswith('.weight'))
  if mapping:
    found['gan.z_emb_dim'], found['gan.nz'] = shapes[f'z_transform.{mapping[0]}.weight']
    found['gan.n_mlp'] = len(mapping) - 1
  layers = _layers(shapes)
  kinds = [kind for _, kind in layers]
  try:
    position = kinds.index('conv') + 1
    nf, found['data.num_channels'] = shapes[f'all_modules.{layers[position - 1][0]}.weight'][:2]
    found['model.ch'] = nf
    levels = 1 + kinds.count('pyramid')
    per_level, rest = divmod(kinds.count('res'), levels)
    if rest or per_level < 3 or (per_level - 3) % 2:
      return found
    blocks = found['model.num_res_blocks'] = (per_level - 3) // 2
    mult, attention = [], []
    for level in range(levels):  # the down path: blocks (each maybe with attention), down block, pyramid conv
      mult.append(shapes[f'all_modules.{layers[position][0]}.Conv_0.weight'][0] // nf)
      attends = False
      for _ in range(blocks):
        position += 1
        if position < len(kinds) and kinds[position] == 'attn':
          attends, position = True, position + 1
      attention += [image_size >> level] if attends else []
      position += 2
  except (ValueError, KeyError, IndexError):  # no input conv, or a layer list of another shape
    return found
  found['model.ch_mult'], found['model.attn_resolutions'] = tuple(mult), tuple(attention)
  return found


LAYER_KEYS = {'GroupNorm_0.style.weight': 'res', 'NIN_0.W': 'attn', 'Conv2d_0.weight': 'pyramid'}


def _layers(shapes: dict) -> list[tuple[int, str]]:
  """[(i, kind)] of the all_modules layers a key identifies (LAYER_KEYS, and 'conv' for a plain conv), by i."""
  kinds = {}
  for key, shape in shapes.items():
    parts = key.split('.', 2)
    if parts[0] == 'all_modules' and len(parts) == 3 and parts[1].isdigit():
      kind = LAYER_KEYS.get(parts[2]) or ('conv' if parts[2] == 'weight' and len(shape) == 4 else None)
      if kind:
        kinds[int(parts[1])] = kind
  return sorted(kinds.items())


CONVERTERS = (DDGANGenerator(),)
