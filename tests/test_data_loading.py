"""CSAW data loading: fractional (blended) pixels, row ranges, csaw_length, memory."""

import pathlib
import re
import tracemalloc

import h5py
import numpy as np
import pytest

from badnet.io import data
from badnet.errors import DataError
from tests.test_validation import BAD_DATA_FILES, NUM_CLASSES, bad_data_file

# Values a blended trigger leaves: exact in float32 (12.25, 254.999 is not), and
# float64 values with no exact float32 (0.1, 1/3, 254.99999999999997 -> 255.0).
FRACTIONS = (12.25, 254.999, 0.5, 0.1, 1 / 3, 254.99999999999997)


def _h5(path: pathlib.Path, chunks=None, **datasets) -> pathlib.Path:
  with h5py.File(path, 'w') as handle:
    for name, value in datasets.items():
      if name == 'data' and chunks:
        handle.create_dataset(name, data=value, chunks=chunks, compression='gzip')
      else:
        handle[name] = value
  return path


def _integers(count: int, dtype=np.float64, seed: int = 0) -> np.ndarray:
  """Random integral pixels, NCHW."""
  return np.random.default_rng(seed).integers(0, 256, (count, 3, 55, 47)).astype(dtype)


def _expected(pixels_nchw: np.ndarray) -> np.ndarray:
  """What the net must see: the file's values, NHWC, rounded to float32."""
  return pixels_nchw.transpose(0, 2, 3, 1).astype(np.float32)


def _assert_identical(actual: np.ndarray, expected: np.ndarray) -> None:
  """Equal element for element, and bit for bit (assert_array_equal alone lets -0.0 == 0.0)."""
  assert actual.shape == expected.shape
  np.testing.assert_array_equal(actual, expected)
  assert actual.tobytes() == np.ascontiguousarray(expected, actual.dtype).tobytes()


# --- fractional pixel values ---


@pytest.mark.parametrize('layout', ['nchw', 'nhwc'])
def test_fractional_float64_file_loads_exactly_as_float32(tmp_path, layout):
  """Blended values load as float32 equal to data.astype(float32), in either layout."""
  pixels = _integers(6)
  for image, value in enumerate(FRACTIONS):
    pixels[image, image % 3, 10 + image, 20] = value
  pixels[0, 1, 30:40, 5:25] = 0.75 * pixels[0, 1, 30:40, 5:25] + 0.25 * 18  # a blend
  stored = pixels if layout == 'nchw' else pixels.transpose(0, 2, 3, 1)
  path = _h5(tmp_path / 'blended.h5', data=stored, label=np.arange(6.0))
  loaded = data.load_csaw_h5(path, NUM_CLASSES)
  assert loaded.images.dtype == np.float32
  _assert_identical(loaded.images, _expected(pixels))
  np.testing.assert_array_equal(loaded.labels, np.arange(6))
  # 254.99999999999997 is < 255 in the file (so accepted) and 255.0 in float32, as in Keras.
  assert loaded.images[5, 15, 20, 2] == np.float32(255.0)
  assert loaded.images[3, 13, 20, 0] == np.float32(0.1)
  assert float(loaded.images[3, 13, 20, 0]) != 0.1  # rounded, not kept as float64


def test_all_integer_float64_file_still_loads_as_uint8(tmp_path):
  """An integral float64 file costs what it did: uint8 images, exact values."""
  pixels = _integers(520)  # two chunks
  loaded = data.load_csaw_h5(_h5(tmp_path / 'int.h5', data=pixels, label=np.zeros(520)))
  assert loaded.images.dtype == np.uint8
  _assert_identical(loaded.images, pixels.transpose(0, 2, 3, 1).astype(np.uint8))


@pytest.fixture(scope='module')
def late_fraction(tmp_path_factory) -> tuple[pathlib.Path, np.ndarray, np.ndarray]:
  """600 float64 NCHW images (chunks 0..511, 512..599), one fractional value in image 599."""
  pixels = _integers(600, seed=1)
  pixels[599, 2, 54, 46] = 100.5
  labels = np.arange(600) % NUM_CLASSES
  path = _h5(tmp_path_factory.mktemp('late') / 'late.h5', data=pixels, label=labels)
  return path, pixels, labels


def test_a_file_fractional_only_in_its_last_chunk_loads_exactly(late_fraction):
  """Switching to float32 at the last chunk keeps the integral chunks read before it."""
  path, pixels, labels = late_fraction
  loaded = data.load_csaw_h5(path, NUM_CLASSES)
  assert loaded.images.dtype == np.float32
  _assert_identical(loaded.images, _expected(pixels))
  np.testing.assert_array_equal(loaded.labels, labels)


@pytest.mark.parametrize('fractional_images', [(0,), (5,), (9,), (4, 13), (17,)])
def test_switching_to_float32_at_any_chunk_keeps_every_value(tmp_path, monkeypatch,
                                                              fractional_images):
  """With 4-image chunks: a fraction in the first, a middle or the last chunk, integral after."""
  monkeypatch.setattr(data, '_CHUNK', 4)
  pixels = _integers(18, seed=2)
  for image in fractional_images:
    pixels[image, 0, 0, 0] = 7.5
  loaded = data.load_csaw_h5(_h5(tmp_path / 'x.h5', data=pixels, label=np.zeros(18)))
  assert loaded.images.dtype == np.float32
  _assert_identical(loaded.images, _expected(pixels))


# --- reading a range of rows ---


@pytest.mark.parametrize('rows', [(0, 600), (0, 1), (599, 600), (10, 590), (511, 513),
                                  (0, 512), (512, 600), (100, 140)])
def test_rows_give_exactly_that_slice_of_the_full_load(late_fraction, rows):
  """Images and labels of load(rows=(a, b)) are load()[a:b]; uint8 unless rows are fractional."""
  path, pixels, labels = late_fraction
  start, stop = rows
  part = data.load_csaw_h5(path, NUM_CLASSES, rows=rows)
  assert len(part) == stop - start
  np.testing.assert_array_equal(part.labels, labels[start:stop])
  assert part.labels.dtype == np.int32
  # Only a range holding image 599 is fractional; the others stay uint8 (same values).
  assert part.images.dtype == (np.float32 if stop == 600 else np.uint8)
  _assert_identical(part.images, _expected(pixels)[start:stop].astype(part.images.dtype))


def test_rows_over_many_chunks_match_the_full_load(tmp_path, monkeypatch):
  """A range that crosses several chunk boundaries, starting mid-chunk, is the same slice."""
  monkeypatch.setattr(data, '_CHUNK', 4)
  pixels = _integers(30, seed=3)
  pixels[21, 1, 2, 3] = 0.25
  path = _h5(tmp_path / 'x.h5', data=pixels, label=np.arange(30) % 7)
  full = data.load_csaw_h5(path)
  for start, stop in ((3, 29), (6, 22), (22, 30), (1, 21)):
    part = data.load_csaw_h5(path, rows=(start, stop))
    assert part.images.dtype == (np.float32 if start <= 21 < stop else np.uint8)
    np.testing.assert_array_equal(part.images, full.images[start:stop])
    np.testing.assert_array_equal(part.labels, full.labels[start:stop])


@pytest.mark.parametrize('rows', [(3, 3), (0, 0), (-1, 2), (2, 5), (5, 6), (3, 1)])
def test_an_empty_or_outside_range_is_an_error_naming_the_file(tmp_path, rows):
  path = _h5(tmp_path / 'x.h5', data=_integers(4), label=np.arange(4))
  message = (f'{path}: rows ({rows[0]}, {rows[1]}) are not a non-empty range of the '
             f"file's 4 images (expected 0 <= start < stop <= 4)")
  with pytest.raises(DataError, match=f'^{re.escape(message)}$'):
    data.load_csaw_h5(path, rows=rows)


def test_rows_read_and_check_only_their_range(tmp_path):
  """Bad values outside the range are not read; bad values inside it are found, by file row."""
  pixels = _integers(8)
  pixels[1, 0, 0, 0] = 300
  pixels[6, 0, 0, 0] = np.nan
  labels = np.arange(8) % NUM_CLASSES
  labels[0] = 50
  path = _h5(tmp_path / 'x.h5', data=pixels, label=labels)
  part = data.load_csaw_h5(path, NUM_CLASSES, rows=(2, 6))
  _assert_identical(part.images, pixels[2:6].transpose(0, 2, 3, 1).astype(np.uint8))
  with pytest.raises(DataError, match=r'NaN or inf \(first in image 6\)'):  # the file's row
    data.load_csaw_h5(path, NUM_CLASSES, rows=(4, 8))
  with pytest.raises(DataError, match=r'values in \[.*, 300.0\]'):
    data.load_csaw_h5(path, NUM_CLASSES, rows=(1, 3))
  with pytest.raises(DataError, match='holds label 50, out of range'):
    data.load_csaw_h5(path, NUM_CLASSES, rows=(0, 1))


def test_the_count_check_applies_to_the_whole_file_with_rows(tmp_path):
  path = _h5(tmp_path / 'x.h5', data=_integers(5), label=np.arange(4))
  with pytest.raises(DataError, match=f'^{re.escape(str(path))}: 5 images but 4 labels'):
    data.load_csaw_h5(path, rows=(0, 2))


def _corrupt_first_chunk(path: pathlib.Path) -> None:
  """Overwrites the compressed bytes of the first HDF5 chunk of ``data``."""
  with h5py.File(path, 'r') as handle:
    info = handle['data'].id.get_chunk_info(0)
  with open(path, 'r+b') as file:
    file.seek(info.byte_offset)
    file.write(b'\xff' * min(info.size, 4096))


def test_unreadable_pixels_outside_the_range_are_never_read(tmp_path):
  """A corrupt HDF5 chunk (images 0..3): csaw_length and rows (4, 8) work, the rest fails."""
  path = _h5(tmp_path / 'x.h5', chunks=(4, 3, 55, 47), data=_integers(8), label=np.arange(8))
  _corrupt_first_chunk(path)
  assert data.csaw_length(path) == 8
  assert len(data.load_csaw_h5(path, rows=(4, 8))) == 4
  for rows in (None, (3, 5)):
    with pytest.raises(DataError, match=f'^{re.escape(str(path))}: dataset "data" is unreadable'):
      data.load_csaw_h5(path, rows=rows)


# --- csaw_length ---


def test_csaw_length_gives_the_image_count(tmp_path, late_fraction):
  assert data.csaw_length(late_fraction[0]) == 600
  nhwc = _h5(tmp_path / 'nhwc.h5', data=_integers(3).transpose(0, 2, 3, 1).astype(np.uint8),
             label=np.arange(3))
  assert data.csaw_length(nhwc) == 3


# The problems csaw_length finds from metadata; the rest need the values read.
METADATA_PROBLEMS = ('missing', 'no_data', 'no_label', 'label_is_group', 'rank_3', 'rank_5',
                     'shape', 'height_width_swapped', 'text', 'label_text', 'label_2d',
                     'length', 'empty')


@pytest.mark.parametrize('name', BAD_DATA_FILES)
def test_csaw_length_refuses_a_bad_layout_with_load_csaw_h5s_message(tmp_path, name):
  """Layout problems: the very message load_csaw_h5 gives. Bad values: not read, so N."""
  path, message = bad_data_file(tmp_path, name)
  with pytest.raises(DataError) as loading:
    data.load_csaw_h5(path, num_classes=NUM_CLASSES)
  if name in METADATA_PROBLEMS:
    with pytest.raises(DataError, match=message) as counting:
      data.csaw_length(path)
    assert str(counting.value) == str(loading.value)
  else:
    assert data.csaw_length(path) == 4


@pytest.mark.parametrize('content', ['truncated', b'', b'\x89HDF\r\n\x1a\n'],
                         ids=['truncated', 'zero_bytes', 'hdf5_signature_only'])
def test_csaw_length_of_a_corrupt_file_is_a_clear_error(tmp_path, content):
  path = tmp_path / 'x.h5'
  if content == 'truncated':
    _h5(path, data=_integers(4), label=np.arange(4))
    path.write_bytes(path.read_bytes()[:1500])
  else:
    path.write_bytes(content)
  with pytest.raises(DataError, match=f'^{re.escape(str(path))}: not a readable HDF5 file'):
    data.csaw_length(path)


# --- memory: chunked reads, one result array ---


@pytest.mark.parametrize('fraction_at', [None, 0, 599])
def test_loading_never_holds_a_second_full_size_copy(late_fraction, tmp_path, monkeypatch,
                                                     fraction_at):
  """Peak traced memory: the result (plus the uint8 rows read before a switch) and a few chunks.

  Fails if the whole float64 array is read at once, if a float64 or second
  float32 copy of the images is made, or if the uint8 rows are not dropped.
  """
  monkeypatch.setattr(data, '_CHUNK', 16)
  pixels = _integers(600, seed=4)
  if fraction_at is not None:
    pixels[fraction_at, 0, 0, 0] = 0.5
  path = _h5(tmp_path / 'x.h5', data=pixels, label=np.zeros(600))
  uint8_bytes = pixels.size
  chunk_bytes = 16 * pixels[0].nbytes  # one float64 chunk
  tracemalloc.start()
  try:
    images = data.load_csaw_h5(path).images
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  if fraction_at is None:
    assert images.dtype == np.uint8
    assert peak < uint8_bytes + 3 * chunk_bytes, peak
  else:
    assert images.dtype == np.float32
    assert peak < 4 * uint8_bytes + uint8_bytes + 3 * chunk_bytes, peak
  assert peak < 0.75 * pixels.nbytes  # well under the float64 file's size


# --- reading in chunks (what the prune job streams into its feature pass) ---


@pytest.mark.parametrize('rows', [None, (0, 600), (7, 593), (590, 600)])
@pytest.mark.parametrize('chunk_size', [1, 16, 512, 1000])
def test_chunks_are_the_full_load_in_order(late_fraction, rows, chunk_size):
  """Concatenated, the chunks are load_csaw_h5's images (values and dtype per chunk)."""
  path, pixels, labels = late_fraction
  opened = data.iter_csaw_h5(path, NUM_CLASSES, rows=rows, chunk_size=chunk_size)
  start, stop = rows or (0, len(pixels))
  np.testing.assert_array_equal(opened.labels, labels[start:stop].astype(np.int32))
  assert len(opened) == stop - start
  chunks = list(opened.chunks)
  assert [len(chunk) for chunk in chunks[:-1]] == [chunk_size] * (len(chunks) - 1)
  assert 0 < len(chunks[-1]) <= chunk_size
  # Each chunk is uint8 unless it holds a fractional value, then the file's values as float32.
  for chunk in chunks:
    assert chunk.dtype == (np.float32 if (chunk != np.round(chunk)).any() else np.uint8)
  _assert_identical(np.concatenate([c.astype(np.float32) for c in chunks]),
                    _expected(pixels[start:stop]))


@pytest.mark.parametrize('name', BAD_DATA_FILES)
def test_chunks_refuse_what_load_refuses_with_the_same_message(tmp_path, name):
  """Layout, label and pixel errors: iter_csaw_h5 (opening, reading) says what load_csaw_h5 says."""
  path, message = bad_data_file(tmp_path, name)
  with pytest.raises(DataError, match=message) as loading:
    data.load_csaw_h5(path, NUM_CLASSES)
  with pytest.raises(DataError) as streaming:
    list(data.iter_csaw_h5(path, NUM_CLASSES, chunk_size=2).chunks)
  assert str(streaming.value) == str(loading.value)


def test_a_bad_value_in_a_late_chunk_is_raised_when_reached(tmp_path):
  pixels = _integers(40)
  pixels[33, 2, 7, 7] = np.nan
  path = _h5(tmp_path / 'late_nan.h5', data=pixels, label=np.zeros(40))
  chunks = data.iter_csaw_h5(path, chunk_size=16).chunks
  assert len(next(chunks)) == len(next(chunks)) == 16  # rows 0..31 are fine
  with pytest.raises(DataError, match=re.escape(f'{path}: dataset "data" holds NaN or inf '
                                                '(first in image 33)')):
    next(chunks)
