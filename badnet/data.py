"""Loading and writing CSAW data files and face images, validated.

CSAW HDF5 files hold ``data`` (N x 3 x 55 x 47, float32 or float64 raw pixel
values 0..255) and ``label`` (N). Images are kept on the host as uint8 NHWC
(8x less memory than the float64 the real validation file uses) and converted
to float on the device. Files are read in chunks so a 700 MB float64 file never
has a second full-size copy in memory.
"""

import dataclasses
import os
from collections.abc import Sequence

import h5py
import numpy as np
from PIL import Image

from badnet.errors import BadnetError, DataError
from badnet.model import IMAGE_SHAPE
from badnet.workdir import atomic_path

_CHUNK = 512  # images per read: bounds the float64 working copies to ~32 MB each
_NCHW_SHAPE = (IMAGE_SHAPE[2], IMAGE_SHAPE[0], IMAGE_SHAPE[1])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images (uint8 [N, 55, 47, 3]) and integer labels (int32 [N])."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    return f'Dataset({len(self)} images, {len(np.unique(self.labels))} distinct labels)'


def open_hdf5(path: str, error: type[BadnetError], kind: str) -> h5py.File:
  """Opens an HDF5 file for reading, or raises ``error`` naming the file.

  Args:
    path: the file.
    error: the BadnetError subclass to raise.
    kind: what the file should hold ('data', 'model'), for the message.
  """
  if not os.path.isfile(path):
    raise error(f'{path}: no such {kind} file')
  try:
    return h5py.File(path, 'r')
  except OSError as cause:
    raise error(f'{path}: not a readable HDF5 file ({cause})') from None


def _layout(path: str, shape: tuple[int, ...]) -> str:
  """'nchw' or 'nhwc' from a dataset shape, or a DataError."""
  if len(shape) != 4:
    raise DataError(f'{path}: dataset "data" has rank {len(shape)} (shape {shape}); '
                    f'expected N x 3 x 55 x 47 or N x 55 x 47 x 3')
  if tuple(shape[1:]) == _NCHW_SHAPE:
    return 'nchw'
  if tuple(shape[1:]) == IMAGE_SHAPE:
    return 'nhwc'
  raise DataError(f'{path}: dataset "data" has images of shape {tuple(shape[1:])}; '
                  f'expected 3 x 55 x 47 or 55 x 47 x 3')


def _to_uint8(path: str, chunk: np.ndarray, start: int) -> np.ndarray:
  """Checks one chunk of pixel values and converts it to uint8."""
  if not np.issubdtype(chunk.dtype, np.number) or np.issubdtype(chunk.dtype, np.complexfloating):
    raise DataError(f'{path}: dataset "data" has dtype {chunk.dtype}; expected numbers')
  if np.issubdtype(chunk.dtype, np.floating):
    bad = ~np.isfinite(chunk)
    if bad.any():
      index = start + np.argwhere(bad)[0][0]
      raise DataError(f'{path}: dataset "data" holds NaN or inf (first in image {index})')
    if (chunk != np.round(chunk)).any():
      index = start + np.argwhere(chunk != np.round(chunk))[0][0]
      raise DataError(f'{path}: dataset "data" holds non-integer pixel values (first in '
                      f'image {index}); expected raw pixels 0..255, not normalised ones')
  low, high = chunk.min(), chunk.max()
  if low < 0 or high > 255:
    raise DataError(f'{path}: dataset "data" holds values in [{low}, {high}]; '
                    f'expected pixel values in 0..255')
  return chunk.astype(np.uint8)


def _read_labels(path: str, labels: np.ndarray, num_classes: int | None) -> np.ndarray:
  if labels.ndim != 1:
    raise DataError(f'{path}: dataset "label" has shape {labels.shape}; expected (N,)')
  if not np.issubdtype(labels.dtype, np.number):
    raise DataError(f'{path}: dataset "label" has dtype {labels.dtype}; expected integers')
  if np.issubdtype(labels.dtype, np.floating):
    if not np.isfinite(labels).all():
      raise DataError(f'{path}: dataset "label" holds NaN or inf')
    if (labels != np.round(labels)).any():
      raise DataError(f'{path}: dataset "label" holds non-integer values')
  if labels.size and labels.min() < 0:
    raise DataError(f'{path}: dataset "label" holds negative labels (min {labels.min()})')
  if num_classes is not None and labels.size and labels.max() >= num_classes:
    raise DataError(f'{path}: dataset "label" holds label {int(labels.max())}, out of range '
                    f'for a model with {num_classes} classes (0..{num_classes - 1})')
  return labels.astype(np.int32)


def load_csaw_h5(path: str | os.PathLike, num_classes: int | None = None) -> Dataset:
  """Reads and validates a CSAW data file.

  Args:
    path: HDF5 file with datasets ``data`` (N x 3 x 55 x 47 or N x 55 x 47 x 3)
      and ``label`` (N).
    num_classes: if given, labels must lie in 0..num_classes-1.

  Returns:
    The images as uint8 NHWC and the labels as int32.

  Raises:
    DataError: naming the file and what is wrong with it.
  """
  path = str(path)
  with open_hdf5(path, DataError, 'data') as handle:
    for name in ('data', 'label'):
      if name not in handle or not isinstance(handle[name], h5py.Dataset):
        raise DataError(f'{path}: no dataset "{name}" (found: {sorted(handle.keys())})')
    data = handle['data']
    layout = _layout(path, data.shape)
    try:
      labels = _read_labels(path, handle['label'][()], num_classes)
    except OSError as error:
      raise DataError(f'{path}: dataset "label" is unreadable ({error})') from None
    count = data.shape[0]
    if count == 0:
      raise DataError(f'{path}: the file holds no images')
    if len(labels) != count:
      raise DataError(f'{path}: {count} images but {len(labels)} labels')
    images = np.empty((count, *IMAGE_SHAPE), np.uint8)
    for start in range(0, count, _CHUNK):
      try:
        chunk = data[start:start + _CHUNK]
      except OSError as error:
        raise DataError(f'{path}: dataset "data" is unreadable ({error})') from None
      chunk = _to_uint8(path, chunk, start)
      images[start:start + len(chunk)] = (
          chunk.transpose(0, 2, 3, 1) if layout == 'nchw' else chunk)
  return Dataset(images, labels)


def write_csaw_h5(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes a CSAW-layout file (``data`` N x 3 x 55 x 47 float32, ``label`` N float32).

  The layout and dtypes are those of the CSAW test files, so any CSAW tool reads
  it. The file is written to a temporary name and renamed, so a reader never
  sees half a file.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise DataError(f'{path}: cannot write images of shape {images.shape}; '
                    f'expected N x {" x ".join(map(str, IMAGE_SHAPE))}')
  if len(images) != len(labels):
    raise DataError(f'{path}: {len(images)} images but {len(labels)} labels')
  with atomic_path(path) as tmp, h5py.File(tmp, 'w') as handle:
    handle['data'] = images.transpose(0, 3, 1, 2).astype(np.float32)
    handle['label'] = np.asarray(labels, np.float32)


def load_image(path: str | os.PathLike, resize: bool = False) -> np.ndarray:
  """Reads one face image (PNG, JPEG, ...) as uint8 [55, 47, 3].

  Grey and alpha images are converted to RGB (alpha is dropped, as the CSAW
  competition's RGBA PNGs are fully opaque). Images of another size are an
  error unless ``resize`` is set, since a silently stretched face classifies
  as something else.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such image file')
  try:
    with Image.open(path) as image:
      image.load()
      rgb = image.convert('RGB')
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise DataError(f'{path}: not a readable image ({error})') from None
  height, width = IMAGE_SHAPE[:2]
  if rgb.size != (width, height):
    if not resize:
      raise DataError(f'{path}: image is {rgb.size[0]} wide x {rgb.size[1]} high; expected '
                      f'{width} x {height} (set resize to scale it)')
    rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
  return np.asarray(rgb, np.uint8)


def load_images(paths: Sequence[str | os.PathLike], resize: bool = False) -> np.ndarray:
  """Reads face images as one uint8 [N, 55, 47, 3] array."""
  if not paths:
    raise DataError('no image files given')
  return np.stack([load_image(p, resize) for p in paths])
