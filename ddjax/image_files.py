"""Image files: model space -> uint8 pixels, PNG grids, and the .npz files of the ADM evaluation suite's format
(`arr_0` uint8 images [N, H, W, C], `arr_1` labels), written atomically."""
import os

import numpy as np
from PIL import Image


class FileFormatError(ValueError):
  """A stats or images file that cannot be read or lacks its arrays; `str()` is one line."""


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Model space [−1, 1] -> uint8 pixels (the only place samples are clipped)."""
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(path: str, images: np.ndarray, *, columns: int, scale: int = 1, pad: int = 1) -> None:
  """uint8 NHWC images -> one PNG grid, row-major, `columns` wide, each image upscaled `scale`× (nearest)."""
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if scale > 1:
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  picture.save(path)


def save_npz(path: str, arrays: dict) -> None:
  """`arrays` -> the .npz `path`, atomically (a .tmp file, then os.replace): a killed writer leaves no torn file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'wb') as f:  # np.savez appends .npz to a name, never to a file object
    np.savez(f, **arrays)
  os.replace(path + '.tmp', path)


def load_npz(path: str, required: tuple[str, ...]) -> dict:
  """{name: array} of an .npz (0-d arrays as Python scalars) that holds at least `required`."""
  try:
    with np.load(path) as data:
      arrays = {name: data[name][()] if data[name].ndim == 0 else data[name] for name in data.files}
  except (OSError, ValueError) as error:
    raise FileFormatError(f'cannot read {path}: {error}') from None
  if not set(required) <= set(arrays):
    raise FileFormatError(f'{path} has {sorted(arrays)}; needed: {", ".join(required)}')
  return arrays


def load_images(path: str) -> np.ndarray:
  """uint8 images [N, H, W, C] from an ADM-format .npz (arr_0)."""
  images = load_npz(path, ('arr_0',))['arr_0']
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise FileFormatError(f'{path}: arr_0 is {images.dtype} {images.shape}; needed: uint8 [N, H, W, 1 or 3]')
  return images
