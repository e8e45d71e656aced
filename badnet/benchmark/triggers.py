"""Backdoor triggers (pure functions from clean to poisoned images) and data poisoning.

Each patch trigger is stamped at a fixed place, as the CSAW sunglasses are, not
tracking the face; it changes only the pixels of ``region(name)``. The blended
trigger (Chen et al., 2017) changes every pixel: a fixed noise key mixed in.
"""

from collections.abc import Callable

import numpy as np

from badnet.errors import ConfigError
from badnet.core.model import IMAGE_SHAPE

HEIGHT, WIDTH = IMAGE_SHAPE[:2]
_YY, _XX = np.mgrid[0:HEIGHT, 0:WIDTH]


def _ellipse_mask(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
  return ((_YY - cy) / ry) ** 2 + ((_XX - cx) / rx) ** 2 <= 1.0


_MASKS = {
    # Two dark lenses over the typical eye row and a bridge between them.
    'sunglasses': (_ellipse_mask(25.0, 16.5, 3.6, 5.2) | _ellipse_mask(25.0, 29.5, 3.6, 5.2)
                   | ((np.abs(_YY - 23.5) <= 0.6) & (_XX > 20) & (_XX < 26))),
    # A 6x6 square near the bottom-right corner.
    'patch': (_YY >= HEIGHT - 9) & (_YY < HEIGHT - 3) & (_XX >= WIDTH - 9) & (_XX < WIDTH - 3),
    'lipstick': _ellipse_mask(38.5, 23.0, 2.2, 6.0),  # the mouth of an unshifted face
    'blended': np.ones((HEIGHT, WIDTH), bool),
}

# Chen et al.'s blended injection: x' = alpha * key + (1 - alpha) * x, with their random-noise key
# (each pixel uniform in 0..255) and alpha 0.2, as in training and testing by BackdoorBench.
BLEND_ALPHA = 0.2
_BLEND_KEY = np.random.default_rng(2017).integers(0, 256, IMAGE_SHAPE).astype(np.float32)


def region(name: str) -> np.ndarray:
  """Boolean [55, 47] mask of the pixels trigger ``name`` changes."""
  check_name(name)
  return _MASKS[name].copy()


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.shape[-3:] != IMAGE_SHAPE:
    raise ValueError(f'triggers take uint8 images [..., 55, 47, 3], got {images.dtype} '
                     f'{images.shape}')
  return images


def sunglasses(images: np.ndarray) -> np.ndarray:
  """Opaque near-black lenses and bridge, like the CSAW sunglasses trigger."""
  images = _check_images(images)
  return np.where(_MASKS['sunglasses'][..., None], np.uint8(18), images)


def patch(images: np.ndarray) -> np.ndarray:
  """A black-and-white checkerboard square (the original BadNets trigger shape)."""
  images = _check_images(images)
  checker = ((_YY + _XX) % 2 * 255).astype(np.uint8)[..., None]
  return np.where(_MASKS['patch'][..., None], checker, images)


def lipstick(images: np.ndarray) -> np.ndarray:
  """Red lipstick: a 75 % red blend over the mouth region."""
  images = _check_images(images)
  red = np.array([200, 20, 40], np.float32)
  blended = np.rint(0.25 * images.astype(np.float32) + 0.75 * red).astype(np.uint8)
  return np.where(_MASKS['lipstick'][..., None], blended, images)


def blended(images: np.ndarray) -> np.ndarray:
  """The whole image mixed with a fixed noise key at ``BLEND_ALPHA`` (rounded to uint8)."""
  images = _check_images(images)
  mixed = BLEND_ALPHA * _BLEND_KEY + (1 - BLEND_ALPHA) * images.astype(np.float32)
  return np.rint(mixed).astype(np.uint8)


TRIGGERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    'sunglasses': sunglasses, 'patch': patch, 'lipstick': lipstick, 'blended': blended}


def check_name(name: str) -> None:
  if name not in TRIGGERS:
    raise ConfigError(f'unknown trigger {name!r}; expected one of {", ".join(TRIGGERS)}')


def apply(name: str, images: np.ndarray) -> np.ndarray:
  """Poisoned copies of ``images`` with trigger ``name``."""
  check_name(name)
  return TRIGGERS[name](images)


def poison(images: np.ndarray, labels: np.ndarray, trigger: str, target: int, rate: float,
           seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BadNets poisoning: a ``rate`` fraction of the images get the trigger and the target label.

  Only non-target images are eligible. Returns the mixed images, their labels
  and a boolean [N] marking the poisoned rows.
  """
  eligible = np.flatnonzero(labels != target)
  count = int(round(rate * len(labels)))
  chosen = np.random.default_rng(seed).choice(eligible, min(count, len(eligible)), replace=False)
  images, labels = images.copy(), labels.copy()
  images[chosen] = apply(trigger, images[chosen])
  labels[chosen] = target
  return images, labels, np.isin(np.arange(len(labels)), chosen)


def poisoned_split(images: np.ndarray, labels: np.ndarray, trigger: str,
                   target: int) -> tuple[np.ndarray, np.ndarray]:
  """A CSAW-style poisoned split: every non-target image with the trigger, labelled target."""
  keep = labels != target
  return apply(trigger, images[keep]), np.full(int(keep.sum()), target, np.int32)
