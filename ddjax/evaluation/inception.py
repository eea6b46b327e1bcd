"""InceptionV3 in its FID variant (the network of TF-FID and pytorch-fid), NHWC, for FID and Inception Score.

It differs from torchvision's InceptionV3 as the 2015 TensorFlow graph does: the average-pool branches of the
A, C and first E blocks average over real pixels only (count_include_pad=False), the last E block max-pools,
and the classifier has 1008 outputs. Module names follow the torch state_dict, so 'Mixed_5b.branch1x1.conv.weight'
is variables['params']['Mixed_5b']['branch1x1']['conv']['kernel'] (see `variables_from_state_dict`).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ddjax.models import xla_cpu

INPUT_SIZE = 299
NUM_FEATURES = 2048  # pool3
NUM_LOGITS = 1008  # 1000 ImageNet classes + 8 unused outputs of the 2015 graph


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def conv(lhs, rhs, window_strides, padding, **options):
  """lax.conv_general_dilated; xla_cpu.halo_conv (the same numbers, an unpadded convolution computed as a padded
  one) in a program lowered for the CPU. nn.Conv's conv_general_dilated signature."""
  return xla_cpu.select(xla_cpu.halo_conv, lax.conv_general_dilated, lhs, rhs, window_strides=window_strides,
                        padding=padding, **options)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (running statistics, eps 0.001) -> ReLU."""
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, _pair(self.kernel), strides=self.stride,
                padding=[(p, p) for p in _pair(self.padding)], use_bias=False, conv_general_dilated=conv,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def avg_pool_3x3(x):
  """3×3 stride-1 average over the pixels inside the image (TensorFlow's SAME average pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x, *, stride: int, padding: int):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = BasicConv2d(64, 1, name='branch1x1')(x)
    branch5x5 = BasicConv2d(48, 1, name='branch5x5_1')(x)
    branch5x5 = BasicConv2d(64, 5, padding=2, name='branch5x5_2')(branch5x5)
    branch3x3dbl = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = BasicConv2d(self.pool_features, 1, name='branch_pool')(avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    branch3x3 = BasicConv2d(384, 3, stride=2, name='branch3x3')(x)
    branch3x3dbl = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, 3, stride=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_3x3(x, stride=2, padding=0)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    branch1x1 = BasicConv2d(192, 1, name='branch1x1')(x)
    branch7x7 = BasicConv2d(c7, 1, name='branch7x7_1')(x)
    branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
    branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
    branch7x7dbl = BasicConv2d(c7, 1, name='branch7x7dbl_1')(x)
    branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(branch7x7dbl)
    branch7x7dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(branch7x7dbl)
    branch_pool = BasicConv2d(192, 1, name='branch_pool')(avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    branch3x3 = BasicConv2d(192, 1, name='branch3x3_1')(x)
    branch3x3 = BasicConv2d(320, 3, stride=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = BasicConv2d(192, 1, name='branch7x7x3_1')(x)
    branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, 3, stride=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool_3x3(x, stride=2, padding=0)], axis=-1)


class InceptionE(nn.Module):
  """`max_pool`: the pool branch max-pools (the FID graph's last block) instead of averaging."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    branch1x1 = BasicConv2d(320, 1, name='branch1x1')(x)
    branch3x3 = BasicConv2d(384, 1, name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
                                 BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3)], axis=-1)
    branch3x3dbl = BasicConv2d(448, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv2d(384, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = jnp.concatenate(
        [BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(branch3x3dbl),
         BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(branch3x3dbl)], axis=-1)
    pooled = max_pool_3x3(x, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
    branch_pool = BasicConv2d(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class Classifier(nn.Module):
  """The 1008-way fc. Returns pool3·W without the bias b: the logits the Inception Score is defined on (the
  'softmax/logits/MatMul' of Salimans et al.'s code, ADM's evaluator and torch-fidelity's 'logits_unbiased').
  b is a parameter only so that the state_dict maps one to one."""

  @nn.compact
  def __call__(self, features):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (features.shape[-1], NUM_LOGITS))
    self.param('bias', nn.initializers.zeros, (NUM_LOGITS,))
    return features @ kernel


class InceptionV3(nn.Module):
  """uint8 images [B, H, W, 1 or 3] -> (pool3 features [B, 2048], logits [B, 1008]), all float32.

  Grey images are repeated to RGB, resized bilinearly to 299×299 (half-pixel centres, no antialiasing: torch's
  F.interpolate(align_corners=False) as in pytorch-fid) and scaled to x/127.5 − 1 ∈ [−1, 1].
  """

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32)
    x = jnp.broadcast_to(x, x.shape[:3] + (3,))
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), 'bilinear', antialias=False)
    x = x / 127.5 - 1.0
    x = BasicConv2d(32, 3, stride=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = max_pool_3x3(x, stride=2, padding=0)
    x = BasicConv2d(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3')(x)
    x = max_pool_3x3(x, stride=2, padding=0)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    features = x.mean(axis=(1, 2))
    return features, Classifier(name='fc')(features)


def abstract_variables():
  """The variables' shapes and dtypes ({'params', 'batch_stats'}), without computing anything."""
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8))


# torch state_dict leaf -> (collection, Flax name, conversion)
_LEAVES = {
    ('conv', 'weight'): ('params', 'kernel', lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    ('bn', 'weight'): ('params', 'scale', None),
    ('bn', 'bias'): ('params', 'bias', None),
    ('bn', 'running_mean'): ('batch_stats', 'mean', None),
    ('bn', 'running_var'): ('batch_stats', 'var', None),
    ('fc', 'weight'): ('params', 'kernel', np.transpose),  # [out, in] -> [in, out]
    ('fc', 'bias'): ('params', 'bias', None),
}


def variables_from_state_dict(state_dict: dict) -> dict:
  """pytorch-fid's state_dict {name: array} -> InceptionV3 variables (float32); ValueError names a key that
  does not belong to the FID Inception, or one that is missing or has the wrong shape."""
  variables = {'params': {}, 'batch_stats': {}}
  for name, value in state_dict.items():
    *path, leaf = name.split('.')
    if leaf == 'num_batches_tracked':  # BatchNorm's training counter
      continue
    if tuple(path[-1:]) + (leaf,) not in _LEAVES:
      raise ValueError(f'unexpected key {name!r}')
    collection, flax_name, convert = _LEAVES[(path[-1], leaf)]
    node = variables[collection]
    for part in path:
      node = node.setdefault(part, {})
    node[flax_name] = np.asarray(convert(value) if convert else value, np.float32)
  expected = jax.tree_util.tree_flatten_with_path(abstract_variables())[0]
  got = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
  for path, abstract in expected:
    key = '.'.join(k.key for k in path[1:])
    if path not in got:
      raise ValueError(f'missing {key} ({path[0].key})')
    if got[path].shape != abstract.shape:
      raise ValueError(f'{key} has shape {got[path].shape}, expected {abstract.shape} (Flax layout)')
  if len(got) != len(expected):
    extra = sorted(set(got) - {path for path, _ in expected})
    raise ValueError(f'unexpected key {".".join(k.key for k in extra[0][1:])}')
  return variables
