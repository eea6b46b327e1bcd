"""Seed ImageNet-64 variant 'res': one residual block per level."""
import pathlib

from ddjax.config import load_config_module


def get_config():
  return load_config_module(pathlib.Path(__file__).with_name('_imagenet64.py')).get_config(blocks='res,clsAtn,chnAtn')
