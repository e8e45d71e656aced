"""Jitted, sharded evaluation: predictions, accuracy, attack success rate.

Batches of one fixed size (a multiple of the device count, the last padded, so
each function compiles once) are split over the local devices, params replicated;
padded rows are dropped before anything is counted.
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from badnet.core import backend, cache, interrupts
from badnet.core import model as model_lib

Params = model_lib.Params
DEFAULT_BATCH_SIZE = 512


@functools.cache
def data_mesh() -> Mesh:
  """A 1-D mesh over all local devices, axis ``data``."""
  return Mesh(np.array(jax.local_devices()), ('data',))


def global_batch_size(batch_size: int, mesh: Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the number of devices."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  devices = mesh.devices.size
  return -(-batch_size // devices) * devices


def _padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int
                    ) -> Iterator[tuple[tuple[np.ndarray, ...], int]]:
  """Yields fixed-size batches of ``arrays`` (padded with zeros) and the real row count."""
  count = len(arrays[0])
  for start in range(0, count, batch_size):
    interrupts.check()
    rows = min(batch_size, count - start)
    batch = []
    for array in arrays:
      chunk = array[start:start + rows]
      if rows < batch_size:
        pad = np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      batch.append(chunk)
    yield tuple(batch), rows


def map_batches(fn: Callable[..., Any], replicated: Any, arrays: tuple[np.ndarray, ...],
                batch_size: int = DEFAULT_BATCH_SIZE, fixed_batch: bool = False) -> Any:
  """``fn(replicated, *batch)``'s per-row outputs [B, ...] over all N rows of ``arrays``, as numpy.

  ``replicated`` (usually params) goes to every device. ``batch_size`` is at
  most N unless ``fixed_batch``, which pads the last batch so inputs of any
  length share one compilation.
  """
  mesh = data_mesh()
  # Fewer rows than a batch (a handful of image files): a smaller batch, not padding.
  if not fixed_batch:
    batch_size = min(batch_size, len(arrays[0]))
  batch_size = global_batch_size(batch_size, mesh)
  rows_sharding = NamedSharding(mesh, P('data'))
  replicated = replicate(replicated)  # a no-op for a tree replicate() placed already
  step = _jitted(fn, rows_sharding)
  outputs = []
  for batch, rows in _padded_batches(arrays, batch_size):
    batch = jax.device_put(batch, rows_sharding)
    outputs.append((step(replicated, *batch), rows))  # dispatch is asynchronous
  pieces = [jax.tree.map(lambda leaf, r=rows: np.asarray(leaf)[:r], out)
            for out, rows in outputs]
  return jax.tree.map(lambda *leaves: np.concatenate(leaves), *pieces)


def replicate(tree: Any) -> Any:
  """``tree`` on every device of ``data_mesh()``: placed once for many ``map_batches`` calls."""
  return jax.device_put(tree, NamedSharding(data_mesh(), P()))


@functools.cache
def _jitted(fn: Callable[..., Any], rows_sharding: NamedSharding) -> Callable[..., Any]:
  return backend.jit(fn, out_shardings=rows_sharding)


# Module-level step functions, so each compiles once per shape (not per call).
def _classes(params_and_mask: tuple[Params, jax.Array | None], images: jax.Array, *,
             precision: str, layer: str) -> jax.Array:
  params, channel_mask = params_and_mask
  return jnp.argmax(model_lib.apply(params, images, channel_mask, layer, precision=precision),
                    axis=-1)


def predict(params: Params, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE,
            channel_mask: np.ndarray | None = None,
            precision: str = model_lib.DEFAULT_PRECISION,
            layer: str = model_lib.FEATURE_LAYER) -> np.ndarray:
  """Predicted classes (int [N]) of ``images`` under ``params`` (and a mask on ``layer``)."""
  if channel_mask is not None:
    channel_mask = np.asarray(channel_mask, np.float32)
  step = cache.bind(_classes, precision=model_lib.check_precision(precision),
                    layer=model_lib.check_layer(layer))
  return map_batches(step, (params, channel_mask), (images,), batch_size)


def percent(hits: np.ndarray) -> float:
  """Percentage of True entries (0 for an empty array)."""
  return 100.0 * float(np.mean(hits)) if len(hits) else 0.0


def accuracy(params: Params, images: np.ndarray, labels: np.ndarray,
             batch_size: int = DEFAULT_BATCH_SIZE,
             channel_mask: np.ndarray | None = None,
             precision: str = model_lib.DEFAULT_PRECISION,
             layer: str = model_lib.FEATURE_LAYER) -> float:
  """Clean accuracy in percent (with ``layer``'s channels masked, if a mask is given)."""
  return percent(predict(params, images, batch_size, channel_mask, precision, layer) == labels)


def attack_success_rate(params: Params, poisoned_images: np.ndarray,
                        target_labels: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE,
                        channel_mask: np.ndarray | None = None,
                        precision: str = model_lib.DEFAULT_PRECISION) -> float:
  """ASR in percent: the accuracy on poisoned inputs labelled with the attacker's target."""
  return accuracy(params, poisoned_images, target_labels, batch_size, channel_mask, precision)


def _level_classes(params_and_masks: tuple[Params, jax.Array], images: jax.Array) -> jax.Array:
  """Classes [B, L] of a batch at every pruning level, from pool_3 computed once."""
  params, masks = params_and_masks
  state = model_lib.apply(params, images, stop='conv_3')

  def one_level(carry, mask):
    # A scan keeps only one level's [B, classes] logits alive at a time.
    return carry, jnp.argmax(model_lib.apply(params, state, mask, start='conv_3'), axis=-1)

  _, classes = jax.lax.scan(one_level, None, masks)
  return classes.T


def sweep_predictions(params: Params, masks: np.ndarray, images: np.ndarray,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Predicted classes (int32 [N, L]) under each of L conv_3 masks; conv_1..pool_3 run once."""
  masks = np.asarray(masks, np.float32)
  return map_batches(_level_classes, (params, masks), (images,), batch_size)


def _channel_means(params: Params, images: jax.Array, *, layer: str) -> jax.Array:
  # Per-image mean over H and W; the host averages over images in float64.
  return model_lib.apply(params, images, stop=layer)['activation'].mean(axis=(1, 2))


def mean_activations(params: Params, images: np.ndarray,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     layer: str = model_lib.FEATURE_LAYER) -> np.ndarray:
  """Mean over N, H, W of each channel of ``layer`` after ReLU and any pooling (float64 [C])."""
  per_image = map_batches(
      cache.bind(_channel_means, layer=model_lib.check_layer(layer)), params, (images,),
      batch_size)
  return per_image.astype(np.float64).mean(axis=0)
