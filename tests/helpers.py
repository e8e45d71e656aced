"""Small inputs shared by tests that need no real data."""

import jax
import numpy as np

from badnet.core import model


def varied_images(count: int, seed: int) -> np.ndarray:
  """uint8 images with a per-image colour, a horizontal gradient and noise.

  A randomly initialised DeepID gives nearly one class to uniform noise; these
  images move its pool_3 features enough to give varied predictions.
  """
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (count, 1, 1, 3))
  ramp = np.linspace(0, 1, model.IMAGE_SHAPE[1])[None, None, :, None]
  gradient = ramp * rng.integers(-120, 120, (count, 1, 1, 3))
  noise = rng.normal(0, 20, (count, *model.IMAGE_SHAPE))
  return np.clip(base + gradient + noise, 0, 255).astype(np.uint8)


# Spread of each layer's pre-activations for Flax's init on varied_images
# (measured once); the random biases below are drawn on the same scale.
_PRE_ACTIVATION_STD = {'conv_1': 115.0, 'conv_2': 58.0, 'conv_3': 49.0, 'conv_4': 36.0,
                       'fc_1': 40.0, 'fc_2': 23.0, 'output': 26.0}


def random_params(num_classes: int, seed: int, conv_bias_scale: float = 0.5,
                  dense_bias_scale: float = 0.02) -> model.Params:
  """A random DeepID whose biases matter: Flax's kernels, biases ~ N(0, scale * layer spread).

  Flax initialises biases to zero, so code that forgets a bias (pruning that
  zeroes only the kernel, a sweep that drops the bias) would pass any test on
  such a net. Here each conv bias is half its layer's pre-activation spread,
  positive or negative (forgetting conv_3's bias when pruning 20 channels
  changes ~40 % of the classes of varied_images); dense biases are smaller,
  so the output bias does not decide the class alone. All are non-zero.
  """
  params = model.init_params(num_classes, seed)
  rng = np.random.default_rng([seed, 7])
  biased = {}
  for layer, weights in params.items():
    scale = conv_bias_scale if layer.startswith('conv') else dense_bias_scale
    bias = rng.normal(0, scale * _PRE_ACTIVATION_STD[layer], weights['bias'].shape)
    biased[layer] = {'kernel': np.asarray(weights['kernel']), 'bias': bias.astype(np.float32)}
  assert all((weights['bias'] != 0).all() for weights in biased.values())
  return biased


def count_compilations(fn) -> int:
  """How many XLA compilations ``fn()`` causes (JAX's backend-compile events)."""
  events = []
  listener = lambda event, duration, **kwargs: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return sum(event == '/jax/core/compile/backend_compile_duration' for event in events)


def set_fields(config, fields: dict) -> None:
  """Sets ``config``'s fields named by dotted paths (e.g. 'anp.iterations') to the values."""
  for path, value in fields.items():
    *sections, name = path.split('.')
    target = config
    for section in sections:
      target = target[section]
    target[name] = value
