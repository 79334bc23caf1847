"""TD errors and Huber loss against numbers worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdqn import double_q_learning, huber_loss, q_learning

Q_TM1 = jnp.array([1.0, 2.0, 3.0])
Q_T = jnp.array([0.0, 4.0, -1.0])


def test_q_learning_bootstraps_from_max(variant):
    # target = 0.5 + 0.9 * max(0, 4, -1) = 4.1; td = 4.1 - q_tm1[1] = 2.1
    td = variant(q_learning)(Q_TM1, jnp.int32(1), 0.5, 0.9, Q_T)
    np.testing.assert_allclose(td, 2.1, rtol=1e-6)


def test_q_learning_terminal_does_not_bootstrap(variant):
    # discount 0 (terminated): target = r = 0.5; td = 0.5 - 2 = -1.5
    td = variant(q_learning)(Q_TM1, jnp.int32(1), 0.5, 0.0, Q_T)
    np.testing.assert_allclose(td, -1.5, rtol=1e-6)


def test_q_learning_batched_with_vmap(variant):
    q_tm1 = jnp.stack([Q_TM1, Q_TM1])
    q_t = jnp.stack([Q_T, Q_T])
    td = variant(jax.vmap(q_learning))(
        q_tm1, jnp.array([1, 2]), jnp.array([0.5, 1.0]), jnp.array([0.9, 0.0]), q_t
    )
    # second: target 1.0, q_tm1[2] = 3 -> -2
    np.testing.assert_allclose(td, [2.1, -2.0], rtol=1e-6)


def test_double_q_learning_selects_with_selector_and_values_with_target(variant):
    q_t_value = jnp.array([10.0, 4.0, -1.0])
    q_t_selector = jnp.array([0.0, 1.0, 5.0])
    # selector picks action 2; its value is -1: target = 0.5 + 0.9 * -1 = -0.4; td = -0.4 - 2
    td = variant(double_q_learning)(Q_TM1, jnp.int32(1), 0.5, 0.9, q_t_value, q_t_selector)
    np.testing.assert_allclose(td, -2.4, rtol=1e-6)
    # plain Q-learning on the same value head would take max = 10
    td_q = variant(q_learning)(Q_TM1, jnp.int32(1), 0.5, 0.9, q_t_value)
    np.testing.assert_allclose(td_q, 0.5 + 9.0 - 2.0, rtol=1e-6)


def test_double_q_learning_terminal(variant):
    td = variant(double_q_learning)(Q_TM1, jnp.int32(0), 2.0, 0.0, Q_T, Q_T)
    np.testing.assert_allclose(td, 1.0, rtol=1e-6)


def test_td_gradient_flows_only_through_prediction():
    def f(q_tm1, q_t):
        return q_learning(q_tm1, jnp.int32(1), 0.5, 0.9, q_t)

    g_tm1, g_t = jax.grad(f, argnums=(0, 1))(Q_TM1, Q_T)
    np.testing.assert_array_equal(g_tm1, [0.0, -1.0, 0.0])
    np.testing.assert_array_equal(g_t, [0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "x, delta, expected",
    [
        (0.5, 1.0, 0.125),  # below delta: 0.5 * 0.25
        (1.0, 1.0, 0.5),  # at delta: both pieces give 0.5
        (-1.0, 1.0, 0.5),
        (3.0, 1.0, 2.5),  # above: 1 * (3 - 0.5)
        (-2.0, 1.0, 1.5),
        (3.0, 2.0, 4.0),  # 2 * (3 - 1)
        (1.5, 2.0, 1.125),  # below delta 2: 0.5 * 2.25
    ],
)
def test_huber_loss_values(variant, x, delta, expected):
    np.testing.assert_allclose(variant(huber_loss)(jnp.float32(x), delta), expected, rtol=1e-6)


def test_huber_gradient_is_clipped_error(variant):
    xs = jnp.array([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 4.0])
    grads = variant(jax.vmap(jax.grad(huber_loss)))(xs)
    np.testing.assert_allclose(grads, [-1.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.0], rtol=1e-6)


def test_q_learning_rejects_wrong_ranks():
    with pytest.raises(AssertionError):
        q_learning(jnp.ones((2, 3)), jnp.int32(0), 0.0, 0.9, Q_T)
    with pytest.raises(AssertionError):
        q_learning(Q_TM1, jnp.float32(1.0), 0.0, 0.9, Q_T)
