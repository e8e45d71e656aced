"""Small inputs shared by tests that need no real data."""

import numpy as np

from badnet import model


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
