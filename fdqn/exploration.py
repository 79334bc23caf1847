"""Epsilon-greedy action selection and epsilon schedules.

Schedules are plain functions of the step count (the optax schedule type), so
they work both on Python ints and inside ``jax.jit`` on traced steps.
"""

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

Schedule = Callable[[chex.Numeric], chex.Numeric]


def check_epsilon(epsilon: Any) -> None:
    """A one-line ValueError for a concrete epsilon outside [0, 1] or NaN.

    Python and numpy numbers and concrete JAX arrays are checked (reading a
    device array is a transfer); traced values, inside ``jit``, pass unchecked.
    """
    if isinstance(epsilon, jax.core.Tracer):
        return
    if isinstance(epsilon, (jax.Array, np.ndarray)):
        if np.size(epsilon) != 1:
            raise ValueError(f"epsilon must be a scalar, got shape {np.shape(epsilon)}")
        epsilon = np.asarray(epsilon).item()
    if isinstance(epsilon, (int, float, np.integer, np.floating)) and not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")


def epsilon_greedy(key: jax.Array, q_values: jax.Array, epsilon: chex.Numeric) -> jax.Array:
    """Chooses the greedy action, or a uniformly random one with probability epsilon.

    A random action may coincide with the greedy one, so the greedy action is
    taken with probability ``1 - epsilon + epsilon / num_actions``, as in Mnih
    et al. (2015). Ties between equal Q-values go to the lowest index.

    Args:
      key: a JAX PRNG key.
      q_values: ``(num_envs, num_actions)`` Q-values, one row per environment.
      epsilon: probability of a random action, scalar in [0, 1].

    Returns:
      ``(num_envs,)`` int32 actions.
    """
    chex.assert_rank(q_values, 2)
    check_epsilon(epsilon)
    num_envs, num_actions = q_values.shape
    explore_key, action_key = jax.random.split(key)
    explore = jax.random.uniform(explore_key, (num_envs,)) < epsilon
    random_actions = jax.random.randint(action_key, (num_envs,), 0, num_actions, dtype=jnp.int32)
    greedy_actions = jnp.argmax(q_values, axis=-1).astype(jnp.int32)
    return jnp.where(explore, random_actions, greedy_actions)


@functools.partial(jax.jit, static_argnums=0)
def select_actions(
    q_fn: Callable, params: Any, key: jax.Array, obs: jax.Array, epsilon: chex.Numeric
) -> jax.Array:
    """Epsilon-greedy actions of the network ``q_fn(params, .)`` for a batch of observations.

    One jit-compiled call for all environments: the Q-values and the choice
    happen on the device, and only the ``(num_envs,)`` actions come back.

    Args:
      q_fn: ``q_fn(params, obs) -> (N, num_actions)`` (static: hashed by identity).
      params: the network parameters.
      key: a JAX PRNG key; split it between calls. On the CPU an ``"rbg"`` key
        (``jax.random.key(seed, impl="rbg")``, as :class:`fdqn.Rollout` uses)
        draws about 3x faster than the default threefry one, which counts for
        small networks.
      obs: ``(N, *obs_shape)`` observations.
      epsilon: probability of a random action.

    Returns:
      ``(N,)`` int32 actions.
    """
    return epsilon_greedy(key, q_fn(params, obs), epsilon)


def _xp(step: Any) -> Any:
    """jax.numpy for traced steps, numpy otherwise: host-side calls never touch the device."""
    return jnp if isinstance(step, jax.core.Tracer) else np


def linear_epsilon(start: float, end: float, duration: int, begin: int = 0) -> Schedule:
    """Epsilon going linearly from ``start`` to ``end`` over ``duration`` steps, then constant.

    The schedule of Mnih et al. (2015) (1.0 to 0.1 over 1M frames) and of
    CleanRL's DQN (1.0 to 0.01 over 10% of the run). Works on Python numbers
    (computed on the host, no device round trip) and on traced JAX steps.

    Args:
      start: epsilon at step ``begin`` and before.
      end: epsilon from step ``begin + duration`` on.
      duration: number of steps of the decay; positive.
      begin: step at which the decay starts.
    """
    _check_epsilons(start, end)
    if not 1 <= duration < float("inf"):
        raise ValueError(f"duration must be a positive number of steps, got {duration}")

    def schedule(step: chex.Numeric) -> chex.Numeric:
        xp = _xp(step)
        fraction = xp.clip((step - begin) / duration, 0.0, 1.0)
        return start + fraction * (end - start)

    return schedule


def exponential_epsilon(start: float = 1.0, end: float = 0.1, decay: float = 100_000) -> Schedule:
    """The notebook's schedule: ``end + (start - end) * exp(-step / decay)``.

    Defaults are the notebook's (1.0, 0.1, 100,000 steps). Epsilon only
    approaches ``end``: after ``decay`` steps it is ``end + 0.368 (start - end)``.

    Args:
      start: epsilon at step 0.
      end: the limit as the step count grows.
      decay: time constant of the decay, in steps; positive.
    """
    _check_epsilons(start, end)
    if not 0 < decay < float("inf"):
        raise ValueError(f"decay must be a positive finite number of steps, got {decay}")

    def schedule(step: chex.Numeric) -> chex.Numeric:
        xp = _xp(step)
        return end + (start - end) * xp.exp(-step / decay)

    return schedule


def _check_epsilons(start: float, end: float) -> None:
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:  # NaN included
            raise ValueError(f"epsilon {name} must be in [0, 1], got {value}")
