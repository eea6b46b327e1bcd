"""torch's parameter layouts -> Flax's, one function per kind of layer (a converter's `transform`)."""
import numpy as np


def same(array):
  """A layout both frameworks share (biases, norm scales, embedding tables)."""
  return array


def linear(array):
  """torch Linear [out, in] -> Flax Dense [in, out]."""
  return np.transpose(array)


def conv(array):
  """torch Conv2d [out, in, kh, kw] -> Flax Conv [kh, kw, in, out]."""
  return np.transpose(array, (2, 3, 1, 0))


def conv1d(array):
  """torch Conv1d with a width-1 kernel [out, in, 1] -> Flax Dense [in, out]."""
  return np.transpose(array[..., 0])
