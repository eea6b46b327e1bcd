"""Seed ImageNet-64 variant 'res_large': one residual block per level, 192 base channels."""
import importlib.util
import pathlib


def _load_sibling(name):
  path = pathlib.Path(__file__).with_name(name)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  return _load_sibling('_imagenet64.py').get_config(blocks='res,clsAtn,chnAtn', ch=192)
