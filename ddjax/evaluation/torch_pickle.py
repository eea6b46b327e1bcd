"""A PyTorch state_dict file -> {name: numpy array}, without torch, in both of torch's file formats.

- zip (torch >= 1.6): `<archive>/data.pkl` is the pickle; each storage is the raw little-endian record
  `<archive>/data/<key>`; a persistent id is ('storage', storage_type, key, location, numel).
- legacy (torch < 1.6): five pickles in a row (magic number, protocol version, sys_info, the object, the list of
  storage keys), then each storage in key order as an 8-byte little-endian element count and its raw bytes; a
  persistent id is ('storage', storage_type, key, location, numel, view_metadata).

The unpickler builds only what a state_dict holds (an OrderedDict of tensors rebuilt by
`torch._utils._rebuild_tensor_v2`); every other global (the argparse.Namespace or optimizer state a training
checkpoint holds beside its state_dicts) becomes an inert stand-in that keeps nothing, so reading a file runs no
code from it.
"""
import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class TorchFileError(ValueError):
  """A file that is not a torch state_dict this reader understands; `str()` is one line."""


class _Storage:
  """A flat typed storage; its `array` is filled when its bytes are read."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)
    self.array = None


class _Tensor:
  """A strided view of a storage, materialised by `numpy()` once every storage has been read."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise TorchFileError('a tensor refers to a storage that the file does not contain')
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
      raise TorchFileError(f'a tensor of shape {self.size} reaches past the end of its storage of {flat.size}')
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                           strides=[s * flat.itemsize for s in self.stride])
    return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _StandIn:
  """What an unknown global in the file unpickles to: accepts any construction and state, keeps none of it."""

  def __new__(cls, *args, **kwargs):
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    pass


_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    **{('torch', name): name for name in _STORAGE_DTYPES},  # a storage type stands for its dtype
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of a state_dict; `persistent_load(pid)` turns a storage id into a _Storage."""

  def __init__(self, file, persistent_load=None):
    super().__init__(file, encoding='latin1')
    self._persistent_load = persistent_load

  def find_class(self, module, name):
    return _GLOBALS.get((module, name), _StandIn)

  def persistent_load(self, pid):
    if self._persistent_load is None or not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise TorchFileError(f'unexpected persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    if storage_type not in _STORAGE_DTYPES:
      raise TorchFileError(f'unsupported storage type {storage_type!r}')
    return self._persistent_load(_STORAGE_DTYPES[storage_type], key)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of the state_dict saved by `torch.save` at `path` (zip or legacy format).

  Raises OSError when the file cannot be read, TorchFileError when it is not such a state_dict.
  """
  state = load(path)
  if not is_state_dict(state):
    raise TorchFileError('it does not hold a state_dict (a dict of tensors)')
  return {str(name): array for name, array in state.items()}


def is_state_dict(value) -> bool:
  """Whether `value` (from `load`) is a non-empty dict of arrays."""
  return isinstance(value, dict) and bool(value) and all(isinstance(v, np.ndarray) for v in value.values())


def load(path: str):
  """The object saved by `torch.save` at `path` (zip or legacy format), every tensor a numpy array inside its
  dicts, lists and tuples; objects of other classes are inert stand-ins.

  Raises OSError when the file cannot be read, TorchFileError when it is not a torch file.
  """
  with open(path, 'rb') as f:
    content = f.read()
  try:
    if zipfile.is_zipfile(io.BytesIO(content)):
      return _materialised(_load_zip(content))
    return _materialised(_load_legacy(io.BytesIO(content)))
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
          zipfile.BadZipFile) as error:
    if isinstance(error, TorchFileError):
      raise
    raise TorchFileError(f'it is truncated or not a torch file ({type(error).__name__}: {error})') from None


def _materialised(value):
  """`value` with every _Tensor inside its dicts, lists and tuples replaced by its array."""
  if isinstance(value, _Tensor):
    return value.numpy()
  if isinstance(value, dict):
    return {key: _materialised(item) for key, item in value.items()}
  if type(value) in (list, tuple):
    return type(value)(_materialised(item) for item in value)
  return value


def _load_zip(content: bytes):
  with zipfile.ZipFile(io.BytesIO(content)) as archive:
    pickles = [name for name in archive.namelist() if name.endswith('/data.pkl') and name.count('/') == 1]
    if len(pickles) != 1:
      raise TorchFileError('a zip file without exactly one <archive>/data.pkl')
    prefix = pickles[0][:-len('data.pkl')]
    if prefix + 'byteorder' in archive.namelist() and archive.read(prefix + 'byteorder') != b'little':
      raise TorchFileError('big-endian storages are not supported')
    storages = {}

    def storage(dtype, key):
      if key not in storages:
        storages[key] = _Storage(dtype)
        storages[key].array = np.frombuffer(archive.read(f'{prefix}data/{key}'), storages[key].dtype)
      return storages[key]

    return _Unpickler(io.BytesIO(archive.read(pickles[0])), storage).load()


def _load_legacy(f: io.BytesIO):
  if _Unpickler(f).load() != _LEGACY_MAGIC:
    raise TorchFileError('neither a zip file nor a legacy torch file (wrong magic number)')
  if _Unpickler(f).load() != _LEGACY_PROTOCOL:
    raise TorchFileError('an unknown legacy torch protocol version')
  sys_info = _Unpickler(f).load()
  if not sys_info.get('little_endian', False):
    raise TorchFileError('big-endian storages are not supported')
  storages = {}

  def storage(dtype, key):
    return storages.setdefault(key, _Storage(dtype))

  state = _Unpickler(f, storage).load()
  for key in _Unpickler(f).load():
    target = storages[str(key)]
    count = int.from_bytes(f.read(8), 'little')
    data = f.read(count * target.dtype.itemsize)
    if len(data) != count * target.dtype.itemsize:
      raise TorchFileError(f'storage {key} is truncated')
    target.array = np.frombuffer(data, target.dtype)
  return state
