"""Epsilon-greedy choice and the two epsilon schedules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdqn import epsilon_greedy, exponential_epsilon, linear_epsilon

Q = jnp.tile(jnp.array([[0.0, 3.0, 1.0, -1.0]]), (20_000, 1))


def test_epsilon_zero_is_greedy(variant):
    q = jnp.array([[0.0, 3.0, 1.0], [5.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    actions = variant(epsilon_greedy)(jax.random.key(0), q, 0.0)
    np.testing.assert_array_equal(actions, [1, 0, 2])
    assert actions.dtype == jnp.int32


def test_epsilon_one_is_uniform(variant):
    actions = np.asarray(variant(epsilon_greedy)(jax.random.key(1), Q, 1.0))
    freq = np.bincount(actions, minlength=4) / len(actions)
    np.testing.assert_allclose(freq, 0.25, atol=0.015)


def test_greedy_probability_is_one_minus_eps_plus_eps_over_a(variant):
    actions = np.asarray(variant(epsilon_greedy)(jax.random.key(2), Q, 0.4))
    # 1 - 0.4 + 0.4 / 4 = 0.7
    assert abs(np.mean(actions == 1) - 0.7) < 0.015


def test_same_key_same_actions():
    a = epsilon_greedy(jax.random.key(3), Q[:100], 0.5)
    b = epsilon_greedy(jax.random.key(3), Q[:100], 0.5)
    np.testing.assert_array_equal(a, b)


def test_exponential_schedule_matches_notebook_formula(variant):
    sched = variant(exponential_epsilon())
    np.testing.assert_allclose(sched(0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(sched(100_000), 0.1 + 0.9 * math.exp(-1.0), rtol=1e-6)
    np.testing.assert_allclose(sched(10_000_000), 0.1, rtol=1e-5)


def test_linear_schedule(variant):
    sched = variant(linear_epsilon(1.0, 0.01, 100))
    np.testing.assert_allclose(sched(0), 1.0)
    np.testing.assert_allclose(sched(50), 0.505, rtol=1e-6)
    np.testing.assert_allclose(sched(100), 0.01, rtol=1e-5)
    np.testing.assert_allclose(sched(10_000), 0.01, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: linear_epsilon(1.5, 0.1, 10),
        lambda: linear_epsilon(1.0, -0.1, 10),
        lambda: linear_epsilon(1.0, 0.1, 0),
        lambda: exponential_epsilon(1.0, 0.1, 0),
    ],
)
def test_bad_schedule_arguments(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("epsilon", [-0.1, 1.5])
def test_epsilon_outside_zero_one_is_refused(epsilon):
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got"):
        epsilon_greedy(jax.random.key(0), Q[:4], epsilon)
