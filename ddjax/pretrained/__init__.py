"""Published checkpoints as ddjax params: `load_params(path, config)`, and `--mode import`, which writes them into a
workdir at step 0.

Files are read without torch: torch state_dicts (.pt/.pth and diffusers' diffusion_pytorch_model.bin, both torch
formats, through evaluation.torch_pickle; a training checkpoint that holds the state_dict under one of
WRAPPER_KEYS, as NVlabs' content.pth holds 'netG_dict', is unwrapped; DDP's `module.` prefix is dropped) and
diffusers' diffusion_pytorch_model.safetensors (the safetensors package's numpy API).

A family of checkpoints is a converter, an object with
- `name`: the family in words, with the config it needs (e.g. "NVlabs DDGAN generator, model.name='ncsnpp'");
- `accepts(keys, config) -> bool`: whether the file's keys and config.model.name are this family's;
- `key_map(config, param_shapes) -> {flax param path: (file key, transform)}`, `transform(array) -> array` in the
  layout of the flax parameter, for every path of `param_shapes` ({flax param path: shape} of the network);
- `ignored(key) -> bool`: file keys the network has no use for (buffers such as a fixed embedding table);
- `hint(shapes, config) -> str | None`: from the file's {key: shape}, the config keys whose values differ from
  what the file was trained with, e.g. "the file has 3 res blocks per level; model.num_res_blocks=2".
The family modules hold them in their tuple CONVERTERS, tried in the order of `CONVERTERS` here; their layout
transforms are those of `layouts`. Nothing is converted before the whole file is found to fit: every parameter's
key present with the right shape after its transform, and no other key but ignored ones.
"""
import os
import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from ddjax import checkpoint, config as config_lib, methods, reporting, workdir as workdir_lib
from ddjax.evaluation import torch_pickle
from ddjax.pretrained import adm, ncsnpp
from ddjax.workdir import WorkdirError

CONVERTERS = adm.CONVERTERS + ncsnpp.CONVERTERS
WRAPPER_KEYS = ('state_dict', 'model', 'netG_dict')  # where training checkpoints keep the network's state_dict
DDP_PREFIX = 'module.'
SHOWN = 3  # keys named per kind of mismatch; the rest are counted


class PretrainedError(Exception):
  """A weights file that cannot be read or does not fit the config; `str()` is one line for the user."""


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: array} of the weights file at `path` (see the module docstring), without DDP's `module.` prefix."""
  try:
    if path.endswith('.safetensors'):
      state = safetensors.numpy.load_file(path)
    else:
      state = _unwrapped(torch_pickle.load(path), path)
  except OSError as error:
    raise PretrainedError(f'cannot read {path}: {error.strerror or error}') from None
  except (safetensors.SafetensorError, torch_pickle.TorchFileError) as error:
    reason = ' '.join(str(error).split())[:200] or type(error).__name__
    raise PretrainedError(f'{path} is not a weights file ddjax reads: {reason}') from None
  if all(key.startswith(DDP_PREFIX) for key in state):
    state = {key[len(DDP_PREFIX):]: value for key, value in state.items()}
  return state


def _unwrapped(content, path: str) -> dict:
  """The state_dict itself, or the one a checkpoint dict holds under the first of WRAPPER_KEYS it has."""
  if torch_pickle.is_state_dict(content):
    return content
  if isinstance(content, dict):
    for key in WRAPPER_KEYS:
      if torch_pickle.is_state_dict(content.get(key)):
        return content[key]
    raise PretrainedError(f'{path} holds no state_dict: a dict of {_listed(map(repr, content))}, none of them a '
                          f'state_dict under {", ".join(map(repr, WRAPPER_KEYS))}')
  raise PretrainedError(f'{path} holds no state_dict (a dict of tensors) but a {type(content).__name__}')


def _listed(items, shown: int = SHOWN) -> str:
  items = list(items)
  more = f' (+{len(items) - shown} more)' if len(items) > shown else ''
  return ', '.join(items[:shown]) + more


# ----------------------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------------------

def param_shapes(config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{flax param path: shape} of create_model(config), the network the sampler uses (the EMA's tree), computed
  without initialising anything."""
  abstract = methods.build(config).abstract_state().ema_params
  return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(abstract).items()}


def load_params(path: str, config) -> dict:
  """Params (nested dict of float32 arrays) of create_model(config) from the weights file at `path`; a
  PretrainedError (one line) when it cannot be read or does not fit."""
  return _load(path, config)[1]


def _load(path: str, config):
  """(the converter that read it, params)."""
  state = read_state_dict(path)
  converter = _converter_for(path, state, config)
  shapes = param_shapes(config)
  key_map = converter.key_map(config, shapes)
  _check_fit(path, converter, key_map, state, shapes, config)
  flat = {p: np.asarray(transform(state[key]), np.float32) for p, (key, transform) in key_map.items()}
  return converter, flax.traverse_util.unflatten_dict(flat)


def _converter_for(path: str, state: dict, config):
  keys = set(state)
  for converter in CONVERTERS:
    if converter.accepts(keys, config):
      return converter
  known = '; '.join(converter.name for converter in CONVERTERS)
  raise PretrainedError(f'{path} is no checkpoint family ddjax knows with model.name={config.model.name!r} '
                        f'(known: {known}); its first keys: {_listed(state, 5)}')


def _check_fit(path: str, converter, key_map: dict, state: dict, shapes: dict, config):
  """PretrainedError naming the converter's hint and the first missing, unexpected and mis-shaped keys (in the
  file's names, in natural order), unless every parameter's key is in the file with its shape and nothing else
  is."""
  used = {key for key, _ in key_map.values()}
  missing = sorted(used - set(state), key=_natural) + ['/'.join(p) + ' (no key maps to it)'
                                                      for p in shapes if p not in key_map]
  unexpected = sorted((key for key in state if key not in used and not converter.ignored(key)), key=_natural)
  misshaped = [f'{key} {tuple(state[key].shape)}' for key in sorted(
      (key for flax_path, (key, transform) in key_map.items()
       if key in state and _converted_shape(transform, state[key]) != shapes[flax_path]), key=_natural)]
  if not (missing or unexpected or misshaped):
    return
  hint = converter.hint({key: tuple(value.shape) for key, value in state.items()}, config)
  problems = [f'{what} {_listed(keys)}' for what, keys in (('missing', missing), ('unexpected', unexpected),
                                                           ('mis-shaped', misshaped)) if keys]
  raise PretrainedError(f'{path} does not fit this config ({converter.name}): '
                        + '; '.join(([hint] if hint else []) + problems))


def _natural(key: str) -> list:
  """'all_modules.10.b' after 'all_modules.9.b': the digit runs compared as numbers."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', key)]


def _converted_shape(transform, array) -> tuple[int, ...] | None:
  try:
    return tuple(transform(array).shape)
  except ValueError:  # a reshape that the array's size does not allow
    return None


# ----------------------------------------------------------------------------------------------------------------
# --mode import
# ----------------------------------------------------------------------------------------------------------------

def import_to_workdir(config, workdir: str):
  """Writes `workdir` as `--mode train` would at step 0, with the network's params and its EMA both the weights of
  config.weights, every other trained network of the method (DDGAN's discriminator) and the optimizer states
  freshly initialised, and config.json. `--mode sample`, `eval` and `sweep` then read it as any workdir, and
  `--mode train` resumes from it at step 0 (fine-tuning).

  The file is read and checked before anything is written (PretrainedError); a workdir that already has
  checkpoints is refused (WorkdirError), so no run is ever overwritten.
  """
  config_lib.validate(config, mode='import')
  converter, params = _load(config.weights, config)
  method = methods.build(config)
  with (workdir_lib.lock(workdir, warn=reporting.console),
        checkpoint.opened(workdir, keep=config.train.keep_checkpoints) as manager):
    if manager.all_steps():
      raise WorkdirError(f'workdir {workdir} already has checkpoints (steps {sorted(manager.all_steps())}); '
                         'import into a new --workdir')
    state = method.initial_state()
    params = jax.tree.map(jnp.asarray, params)
    trained = params if method.ema_of is None else {**state.params, method.ema_of: params}
    # Adam's moments start at zero whatever the params, so the fresh optimizer state is the initial one.
    state = state.replace(params=trained, ema_params=params)
    workdir_lib.write_config(workdir, config)
    checkpoint.save(manager, 0, state)
    checkpoint.wait(manager)
  fresh = [name for name in state.params if name != method.ema_of] if method.ema_of else []
  count = sum(x.size for x in jax.tree.leaves(params))
  reporting.console(f'imported {config.weights} ({converter.name}, {count:,} parameters) into '
                    f'{os.path.join(workdir, "checkpoints")} at step 0: params and EMA from the file'
                    + (f', {" and ".join(fresh)} freshly initialised' if fresh else '')
                    + '; sample it with --mode sample, fine-tune it with --mode train')
  return state
