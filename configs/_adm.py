"""Shared base of the configs on the ADM U-Net (ddjax/models/adm.py): the digits default with its model section
replaced by the ADM network's keys, set to `model_keys` over DDPM's network (single-head attention at 16×16, no
scale-shift norm, convolutional resampling).

Config files are loaded by path (ml_collections config_flags), so siblings are loaded by path as well.
"""
import pathlib

import ml_collections

from ddjax.config import load_config_module


def get_config(**model_keys):
  config = load_config_module(pathlib.Path(__file__).with_name('digits.py')).get_config()
  config.model = model = ml_collections.ConfigDict()
  model.name = 'adm'
  model.layout = 'adm'  # 'ddpm': DDPM's own timestep embedding, stride-2 padding and GroupNorm ε
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.num_heads = 1
  model.num_head_channels = -1  # -1: heads by count (model.num_heads); else channels per head
  model.scale_shift_norm = False
  model.resblock_updown = False
  model.attention_order = 'legacy'
  model.dropout = 0.0
  model.rescale_timesteps = False  # the network sees t·1000/T (improved-diffusion's default)
  model.remat = False
  model.update(model_keys)
  return config
