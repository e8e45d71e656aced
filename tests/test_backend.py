"""The CPU compile options and the max-pool written for XLA's CPU code, against jax's own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from badnet.core import backend, model, train
from tests import helpers


def _flax_pool(x):
  return nn.max_pool(x, (2, 2), (2, 2), 'VALID')


@pytest.mark.parametrize('shape', [(3, 52, 44, 20), (3, 24, 20, 40), (3, 10, 8, 60),
                                   (2, 7, 6, 5), (2, 6, 9, 3)])  # DeepID's maps, odd sizes
def test_max_pool_equals_flax_max_pool_values_and_gradients_ties_included(shape):
  rng = np.random.default_rng(sum(shape))
  # Small integers after a ReLU: most windows hold ties, zeros and positive ones.
  x = jnp.asarray(np.maximum(rng.integers(-3, 4, shape), 0), jnp.float32)
  grad = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])),
                     jnp.float32)
  ours, our_vjp = jax.vjp(model.max_pool, x)
  theirs, their_vjp = jax.vjp(_flax_pool, x)
  np.testing.assert_array_equal(ours, theirs)
  ours_grad, theirs_grad = our_vjp(grad)[0], their_vjp(grad)[0]
  np.testing.assert_array_equal(ours_grad, theirs_grad)
  # Each window's gradient sits on one element, the first maximum.
  assert np.count_nonzero(ours_grad) == np.count_nonzero(grad)


def test_a_train_step_with_either_pool_gives_the_same_params(monkeypatch):
  params = helpers.random_params(11, seed=3)
  images = helpers.varied_images(16, seed=1)
  labels = np.arange(16, dtype=np.int32) % 11
  mask = np.ones(60, np.float32)
  mask[::3] = 0

  def one_step():
    optimizer = train.make_optimizer(train.Recipe(epochs=1), 1)
    step = backend.jit(lambda p, s: train.train_step(p, s, images, labels, mask,
                                                     {'conv_3': mask}, optimizer=optimizer))
    return step(params, optimizer.init(params))[0]

  ours = one_step()
  monkeypatch.setattr(model, 'max_pool', _flax_pool)
  theirs = one_step()
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  assert not np.array_equal(ours['conv_1']['kernel'], params['conv_1']['kernel'])


def _compiled_text(jit) -> str:
  params = helpers.random_params(11, seed=0)
  images = helpers.varied_images(4, seed=0)
  return jit(lambda p, x: model.apply(p, x)).lower(params, images).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the options are for a CPU')
def test_on_a_cpu_no_fusion_goes_to_ynnpack(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert backend.compiler_options() == {backend.YNN_OPTION: ''}
  assert '__ynn_fusion' not in _compiled_text(backend.jit)
  if '__ynn_fusion' not in _compiled_text(jax.jit):
    pytest.skip("this jaxlib's defaults send nothing to YNNPACK: nothing to turn off")


def test_a_users_own_ynn_flag_is_kept(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', f'--{backend.YNN_OPTION}=individual_dot')
  assert backend.compiler_options() is None
