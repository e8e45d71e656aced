"""Loading and writing CSAW data files and face images, validated.

CSAW HDF5 files hold ``data`` (N x 3 x 55 x 47 or N x 55 x 47 x 3, raw pixels in [0, 255], any
numeric dtype) and ``label`` (N). Images are read in chunks and kept as NHWC uint8, or float32
when a value is fractional (a blended trigger): the file's values in less memory than float64."""

import dataclasses
import operator
import os
from collections.abc import Iterator, Sequence

import h5py
import numpy as np
from PIL import Image

from badnet.errors import BadnetError, DataError
from badnet.core.model import IMAGE_SHAPE
from badnet.io.workdir import atomic_path

_CHUNK = 512  # images per read: bounds the float64 working copies to ~32 MB each
_NCHW_SHAPE = (IMAGE_SHAPE[2], IMAGE_SHAPE[0], IMAGE_SHAPE[1])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images ([N, 55, 47, 3], uint8, or float32 if any value is fractional); labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    return f'Dataset({len(self)} images, {len(np.unique(self.labels))} distinct labels)'


def open_hdf5(path: str, error: type[BadnetError], kind: str) -> h5py.File:
  """Opens an HDF5 file for reading, or raises ``error`` naming the file (a ``kind`` file)."""
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
  layout = {_NCHW_SHAPE: 'nchw', IMAGE_SHAPE: 'nhwc'}.get(tuple(shape[1:]))
  if layout is None:
    raise DataError(f'{path}: dataset "data" has images of shape {tuple(shape[1:])}; '
                    f'expected 3 x 55 x 47 or 55 x 47 x 3')
  return layout


def _to_uint8(path: str, chunk: np.ndarray, start: int) -> tuple[np.ndarray | None, float]:
  """Checks one chunk of pixel values: its uint8 copy (None unless all are integers), its maximum.
  NaN/inf and values outside [0, 255] are a DataError; ``start`` is the chunk's first row."""
  # Equal to its uint8 cast exactly when every value is an integer in 0..255 (others cast to
  # something else, hence errstate); image 0 alone shows a blended file's fractions.
  with np.errstate(invalid='ignore'):
    if np.array_equal(chunk[0].astype(np.uint8), chunk[0]):
      as_uint8 = chunk.astype(np.uint8)
      if np.array_equal(as_uint8, chunk):
        return as_uint8, float(as_uint8.max(initial=0))
  low, high = chunk.min(), chunk.max()
  if not (low >= 0 and high <= 255):  # NaN fails both comparisons
    if np.issubdtype(chunk.dtype, np.floating) and not np.isfinite(chunk).all():
      index = start + np.argwhere(~np.isfinite(chunk))[0][0]
      raise DataError(f'{path}: dataset "data" holds NaN or inf (first in image {index})')
    raise DataError(f'{path}: dataset "data" holds values in [{low}, {high}]; '
                    f'expected pixel values in 0..255')
  return None, float(high)  # fractional values in range: the caller keeps them as float32


def _read_labels(path: str, labels: np.ndarray, num_classes: int | None) -> np.ndarray:
  """``labels`` (shape and dtype checked by ``_datasets``) as int32, checked as integers."""
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


def _datasets(path: str, handle: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset, str]:
  """``data``, ``label`` and the layout; checks shapes, dtypes and counts, reading no values."""
  for name in ('data', 'label'):
    if name not in handle or not isinstance(handle[name], h5py.Dataset):
      raise DataError(f'{path}: no dataset "{name}" (found: {sorted(handle.keys())})')
  data, labels = handle['data'], handle['label']
  layout = _layout(path, data.shape)
  if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
    raise DataError(f'{path}: dataset "data" has dtype {data.dtype}; expected numbers')
  if len(labels.shape) != 1:
    raise DataError(f'{path}: dataset "label" has shape {labels.shape}; expected (N,)')
  if not np.issubdtype(labels.dtype, np.number):
    raise DataError(f'{path}: dataset "label" has dtype {labels.dtype}; expected integers')
  count = data.shape[0]
  if count == 0:
    raise DataError(f'{path}: the file holds no images')
  if labels.shape[0] != count:
    raise DataError(f'{path}: {count} images but {labels.shape[0]} labels')
  return data, labels, layout


def csaw_length(path: str | os.PathLike) -> int:
  """The number of images in a CSAW data file, from its metadata, checked as in ``load_csaw_h5``."""
  path = str(path)
  with open_hdf5(path, DataError, 'data') as handle:
    return int(_datasets(path, handle)[0].shape[0])


@dataclasses.dataclass(frozen=True)
class CsawChunks:
  """A CSAW file's labels, and its images as a one-pass iterator of validated NHWC chunks: uint8
  if all a chunk's values are integers, else float32. NaN, inf or a value outside [0, 255] raises
  a DataError when reached, and so does the end of a file whose fractional values all lie in
  [0, 1] (normalised pixels)."""
  path: str
  labels: np.ndarray  # int32, checked
  chunks: Iterator[np.ndarray]

  def __len__(self) -> int:
    return len(self.labels)


def iter_csaw_h5(path: str | os.PathLike, num_classes: int | None = None, *,
                 rows: tuple[int, int] | None = None, chunk_size: int | None = None) -> CsawChunks:
  """Opens a CSAW file to read in chunks, checking now all but the pixels (checked per chunk)."""
  path = str(path)
  with open_hdf5(path, DataError, 'data') as handle:
    _, label, _ = _datasets(path, handle)
    count = label.shape[0]  # > 0 (checked), so the whole file passes the range check
    start, stop = (0, count) if rows is None else (operator.index(r) for r in rows)
    if not 0 <= start < stop <= count:
      raise DataError(f'{path}: rows ({start}, {stop}) are not a non-empty range of the file\'s '
                      f'{count} images (expected 0 <= start < stop <= {count})')
    try:
      labels = _read_labels(path, label[start:stop], num_classes)
    except OSError as error:
      raise DataError(f'{path}: dataset "label" is unreadable ({error})') from None
  return CsawChunks(path, labels, _chunks(path, start, stop, chunk_size or _CHUNK))


def _chunks(path: str, start: int, stop: int, chunk_size: int) -> Iterator[np.ndarray]:
  """The images of rows start..stop, validated, ``chunk_size`` at a time (see ``CsawChunks``)."""
  with open_hdf5(path, DataError, 'data') as handle:
    data, _, layout = _datasets(path, handle)
    highest, fractional = 0.0, False
    for first in range(start, stop, chunk_size):
      try:
        chunk = data[first:min(first + chunk_size, stop)]
      except OSError as error:
        raise DataError(f'{path}: dataset "data" is unreadable ({error})') from None
      as_uint8, chunk_max = _to_uint8(path, chunk, first)
      highest = max(highest, chunk_max)
      fractional |= as_uint8 is None
      values = chunk if as_uint8 is None else as_uint8
      # One pass to a contiguous NHWC array (converting to float32 on the way).
      nhwc = np.empty((len(values), *IMAGE_SHAPE), np.float32 if as_uint8 is None else np.uint8)
      nhwc[...] = values.transpose(0, 2, 3, 1) if layout == 'nchw' else values
      yield nhwc
  if fractional and highest <= 1:
    raise DataError(f'{path}: dataset "data" holds fractional values, all in [0, 1]: '
                    f'normalised pixels? The nets take raw pixel values 0..255')


def load_csaw_h5(path: str | os.PathLike, num_classes: int | None = None, *,
                 rows: tuple[int, int] | None = None) -> Dataset:
  """Reads and validates a CSAW data file, or its rows [start, stop) (one process's share).
  Images are uint8 if every value read is an integer, else float32 (float64 values rounded to the
  nearest float32, as Keras' float32 model sees them). ``num_classes``, if given, bounds the
  labels. A DataError names the file and what is wrong with it."""
  opened = iter_csaw_h5(path, num_classes, rows=rows)
  # np.empty pages are only resident once written: the part of a uint8 array
  # left unwritten when switching to float32 costs nothing.
  images = np.empty((len(opened), *IMAGE_SHAPE), np.uint8)
  offset = 0
  for chunk in opened.chunks:
    if chunk.dtype != images.dtype and images.dtype == np.uint8:
      wider = np.empty(images.shape, np.float32)
      wider[:offset] = images[:offset]  # integers: exact in float32
      images = wider
    images[offset:offset + len(chunk)] = chunk
    offset += len(chunk)
  return Dataset(images, opened.labels)


def write_csaw_h5(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes a CSAW file atomically (``data`` N x 3 x 55 x 47 float32, ``label`` N float32)."""
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
  """Reads one face image (PNG, JPEG, ...) as RGB uint8 [55, 47, 3], alpha dropped (the CSAW RGBA
  PNGs are opaque). Another size is an error unless ``resize``: a silently stretched face
  classifies as something else."""
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
