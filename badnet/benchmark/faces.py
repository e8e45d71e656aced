"""A deterministic generator of synthetic face images for K identities.

Identities have stable traits (head, skin, hair, eyes, brows, nose, mouth, tint);
samples vary pose, lighting, background and noise, so a net must learn the
traits, not a template. The same seed gives byte-identical images everywhere.
"""

import collections

import numpy as np

from badnet.core.model import IMAGE_SHAPE

HEIGHT, WIDTH = IMAGE_SHAPE[:2]
SPLITS = ('train', 'valid', 'test')
_CENTRE_Y, _CENTRE_X = 29.0, 23.0  # where an unshifted face is centred

# Per-identity traits, each an array over identities (colours [K, 3]).
Traits = collections.namedtuple('Traits', (
    'head_height head_width skin hair hairline hair_volume eye_y eye_spacing eye_size iris '
    'brow_gap brow_tilt brow_thickness nose_length nose_width mouth_y mouth_width mouth_height '
    'lips background'))


def identity_traits(num_identities: int, seed: int) -> Traits:
  """The stable traits of identities 0..K-1 (a function of ``seed`` only)."""
  rng = np.random.default_rng([seed, 0])
  k = num_identities
  uniform = lambda low, high: rng.uniform(low, high, k)
  skin_tone = rng.uniform(0, 1, k)[:, None]
  skin = (1 - skin_tone) * np.array([235, 200, 175]) + skin_tone * np.array([95, 60, 40])
  skin = skin + rng.normal(0, 10, (k, 3))
  hair = rng.choice(np.array([[25, 20, 18], [70, 45, 25], [140, 95, 50], [200, 170, 110],
                              [120, 120, 120], [160, 60, 30]]), k) + rng.normal(0, 12, (k, 3))
  return Traits(
      head_height=uniform(16.5, 21.0), head_width=uniform(11.5, 15.5), skin=skin, hair=hair,
      hairline=uniform(-15.0, -8.0), hair_volume=uniform(1.05, 1.3),
      eye_y=uniform(-6.0, -2.5), eye_spacing=uniform(4.5, 7.5), eye_size=uniform(0.8, 1.3),
      iris=rng.uniform(20, 160, (k, 3)), brow_gap=uniform(2.5, 4.5), brow_tilt=uniform(-0.3, 0.3),
      brow_thickness=uniform(0.8, 2.2), nose_length=uniform(4.0, 8.0),
      nose_width=uniform(1.0, 2.5), mouth_y=uniform(7.0, 11.0), mouth_width=uniform(3.0, 6.5),
      mouth_height=uniform(0.8, 2.0), lips=skin * 0.6 + rng.uniform(0, 1, (k, 3)) * [90, 20, 30],
      background=rng.uniform(30, 230, (k, 3)))


def _soft_inside(distance: np.ndarray) -> np.ndarray:
  """Coverage of a shape from a signed distance in pixels (negative inside), ~1 px edge."""
  return np.clip(0.5 - distance, 0.0, 1.0, dtype=np.float32)


def _ellipse(u, v, cu, cv, ru, rv) -> np.ndarray:
  """Soft coverage of an axis-aligned ellipse; radii in pixels."""
  r = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
  return _soft_inside((r - 1.0) * np.minimum(ru, rv))


def _paint(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> np.ndarray:
  """Alpha-blends ``colour`` ([N, 3] or [N, H, W, 3]) over ``canvas`` where covered."""
  colour = np.asarray(colour if colour.ndim == 4 else colour[:, None, None, :], np.float32)
  return canvas + coverage[..., None] * (colour - canvas)


def render(labels: np.ndarray, traits: Traits, rng: np.random.Generator) -> np.ndarray:
  """Renders one image per label: uint8 [N, 55, 47, 3]."""
  n = len(labels)
  t = {name: values[labels] for name, values in traits._asdict().items()}
  # Per-image scalar -> broadcastable over pixels; float32 renders faster than float64.
  col = lambda a: np.asarray(a, np.float32)[:, None, None]
  scale = rng.uniform(0.88, 1.12, n)
  shift_y, shift_x = rng.uniform(-3, 3, n), rng.uniform(-3, 3, n)
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
  # Face-centred coordinates in "face pixels": the whole face moves and scales.
  v = (yy[None] - col(_CENTRE_Y + shift_y)) / col(scale)
  u = (xx[None] - col(_CENTRE_X + shift_x)) / col(scale)

  # Background: the identity's tint mixed with this shot's colour, and a gradient.
  base = 0.5 * t['background'] + 0.5 * rng.uniform(20, 235, (n, 3))
  ramp = (xx / WIDTH - 0.5)[None, ..., None] * rng.uniform(-60, 60, (n, 1, 1, 3))
  canvas = (base[:, None, None, :] + ramp).astype(np.float32)

  height, width = col(t['head_height']), col(t['head_width'])
  hair = _ellipse(u, v, 0, -2.0, width * col(t['hair_volume']), height * 1.05)
  hair = hair * (v < col(t['hairline']) + 6)  # hair sits on top of the head
  canvas = _paint(canvas, hair, t['hair'])
  canvas = _paint(canvas, _ellipse(u, v, 0, 0, width, height), t['skin'])
  fringe = _ellipse(u, v, 0, 0, width, height) * _soft_inside(v - col(t['hairline']))
  canvas = _paint(canvas, fringe, t['hair'])

  eye_y, spacing, size = col(t['eye_y']), col(t['eye_spacing']), col(t['eye_size'])
  for side in (-1.0, 1.0):
    centre_u = side * spacing
    canvas = _paint(canvas, _ellipse(u, v, centre_u, eye_y, 2.6 * size, 1.4 * size),
                    np.full((n, 3), 235.0, np.float32))
    canvas = _paint(canvas, _ellipse(u, v, centre_u, eye_y, 1.2 * size, 1.2 * size), t['iris'])
    brow_v = eye_y - col(t['brow_gap']) + col(t['brow_tilt']) * (side * u - spacing)
    brow = (_soft_inside(np.abs(v - brow_v) - col(t['brow_thickness']) / 2)
            * _soft_inside(np.abs(u - centre_u) - 3.2 * size))
    canvas = _paint(canvas, brow, t['hair'] * 0.7)

  nose_top = eye_y + 1.5
  nose = (_soft_inside(np.abs(u) - col(t['nose_width']) / 2)
          * _soft_inside(nose_top - v) * _soft_inside(v - nose_top - col(t['nose_length'])))
  canvas = _paint(canvas, 0.5 * nose, t['skin'] * 0.7)
  canvas = _paint(canvas, _ellipse(u, v, 0, col(t['mouth_y']), col(t['mouth_width']),
                                   col(t['mouth_height'])), t['lips'])

  # Lighting: overall gain, a directional falloff, a colour cast; then noise.
  direction = rng.uniform(0, 2 * np.pi, n)
  light = (col(rng.uniform(0.7, 1.25, n))
           * (1 + col(rng.uniform(0, 0.35, n))
              * (np.cos(col(direction)) * (xx[None] / WIDTH - 0.5)
                 + np.sin(col(direction)) * (yy[None] / HEIGHT - 0.5))))
  canvas = canvas * light[..., None] * rng.uniform(0.9, 1.1, (n, 1, 1, 3))
  noise = rng.standard_normal(canvas.shape, dtype=np.float32)
  canvas = canvas + noise * col(rng.uniform(2, 8, n))[..., None]
  return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def generate_faces(num_identities: int, per_identity: int, seed: int, split: str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Images (uint8 [K * per_identity, 55, 47, 3]) and labels (int32), identity-major.

  A seed's splits share the identities; their samples are drawn independently.
  """
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')
  traits = identity_traits(num_identities, seed)
  labels = np.repeat(np.arange(num_identities, dtype=np.int32), per_identity)
  rng = np.random.default_rng([seed, 1 + SPLITS.index(split)])
  chunks = [render(labels[i:i + 1024], traits, rng) for i in range(0, len(labels), 1024)]
  return np.concatenate(chunks), labels
