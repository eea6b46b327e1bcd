"""Seed ImageNet-64 variant 'res_conv': a residual block then a ConvNeXt block per level."""
import importlib.util
import pathlib


def _load_sibling(name):
  path = pathlib.Path(__file__).with_name(name)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  return _load_sibling('_imagenet64.py').get_config(blocks='res,conv,clsAtn,chnAtn')
