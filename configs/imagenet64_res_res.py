"""Seed ImageNet-64 variant 'res_res': two residual blocks per level (one of the seed's best)."""
import pathlib

from ddjax.config import load_config_module


def get_config():
  return load_config_module(pathlib.Path(__file__).with_name('_imagenet64.py')).get_config(blocks='res,res,clsAtn,chnAtn')
