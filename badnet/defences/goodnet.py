"""GoodNet: B's class where B and its pruned copy B' agree, else N ("backdoor detected")."""

import jax
import jax.numpy as jnp
import numpy as np

from badnet.core import evaluate
from badnet.core import model as model_lib

Params = model_lib.Params


def combine(classes_b: jax.Array, classes_b_prime: jax.Array, num_classes: int) -> jax.Array:
  """GoodNet's class from the two nets' classes: B's where they agree, else N."""
  return jnp.where(classes_b == classes_b_prime, classes_b, num_classes)


def goodnet(params_b: Params, params_b_prime: Params, images: jax.Array) -> jax.Array:
  """GoodNet's class in 0..N for each image (a pure, jittable function)."""
  classes_b = jnp.argmax(model_lib.apply(params_b, images), axis=-1)
  classes_b_prime = jnp.argmax(model_lib.apply(params_b_prime, images), axis=-1)
  return combine(classes_b, classes_b_prime, model_lib.num_classes_of(params_b))


def goodnet_masked(params_b: Params, channel_mask: jax.Array, images: jax.Array,
                   layer: str = model_lib.FEATURE_LAYER,
                   precision: str = model_lib.DEFAULT_PRECISION) -> jax.Array:
  """``goodnet`` with B' = B pruned by ``channel_mask``; the layers up to ``layer`` run once."""
  state = model_lib.apply(params_b, images, stop=layer, precision=precision)
  classes_b, classes_b_prime = (
      jnp.argmax(model_lib.apply(params_b, state, mask, start=layer, precision=precision), axis=-1)
      for mask in (None, channel_mask))
  return combine(classes_b, classes_b_prime, model_lib.num_classes_of(params_b))


def _goodnet_step(both: tuple[Params, Params], images: jax.Array) -> jax.Array:
  return goodnet(both[0], both[1], images)


def predict(params_b: Params, params_b_prime: Params, images: np.ndarray,
            batch_size: int = evaluate.DEFAULT_BATCH_SIZE) -> np.ndarray:
  """GoodNet's classes (int [N]) for host images, batched and sharded."""
  return evaluate.map_batches(_goodnet_step, (params_b, params_b_prime), (images,), batch_size)


def metrics(clean_classes: np.ndarray, clean_labels: np.ndarray,
            poisoned_classes: np.ndarray, target_labels: np.ndarray,
            num_classes: int) -> dict[str, float]:
  """GoodNet's figures in percent: clean_acc, asr, detection_rate (poisoned inputs flagged
  N) and false_alarm_rate (clean inputs flagged N)."""
  return {
      'clean_acc': evaluate.percent(clean_classes == clean_labels),
      'asr': evaluate.percent(poisoned_classes == target_labels),
      'detection_rate': evaluate.percent(poisoned_classes == num_classes),
      'false_alarm_rate': evaluate.percent(clean_classes == num_classes),
  }


def figures(b_classes: dict[str, np.ndarray], net_classes: dict[str, np.ndarray],
            labels: dict[str, np.ndarray], num_classes: int) -> tuple[dict, dict]:
  """A repaired net's {clean_acc, asr} and its GoodNet's ``metrics`` (with B), in percent.

  The classes and labels (the target for poisoned inputs) are keyed 'clean_test' and
  'poisoned_test'.
  """
  clean, poisoned = labels['clean_test'], labels['poisoned_test']
  net = {'clean_acc': evaluate.percent(net_classes['clean_test'] == clean),
         'asr': evaluate.percent(net_classes['poisoned_test'] == poisoned)}
  g_classes = {key: np.asarray(combine(b_classes[key], net_classes[key], num_classes))
               for key in ('clean_test', 'poisoned_test')}
  good = metrics(g_classes['clean_test'], clean, g_classes['poisoned_test'], poisoned,
                 num_classes)
  return net, good
