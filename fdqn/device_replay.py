"""A replay buffer that is a pytree on the device, for training inside ``jax.lax.scan``.

:class:`TransitionRing` keeps whole transitions ``(obs, action, reward,
next_obs, terminated)`` in one ring per environment: arrays of shape
``(num_envs, per_env, ...)``, written one column per step for all
environments at once. Storing ``next_obs`` beside ``obs`` doubles the
observation memory, which is what lets environments that reset in the same
step (gymnax: the step returns the first observation of the next episode,
and the last one of the ended episode on the side) store every transition
in one write. For vector observations that is a few bytes per transition.

The functions are pure: :func:`ring_add` returns a new ring whose arrays are
the old ones updated at one column. Carried through ``lax.scan`` (or donated
to a jitted call), XLA writes that column in place, never copying the
buffer per step. Sampling is uniform over the transitions held, with
replacement, drawn with ``jax.random``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fdqn.learner import Batch


class TransitionRing(NamedTuple):
    """Replay contents and write position; a pytree (every field an array).

    Attributes:
      obs, next_obs: ``(num_envs, per_env, *obs_shape)`` observations.
      action: ``(num_envs, per_env)`` int32 actions.
      reward: ``(num_envs, per_env)`` float32 rewards.
      terminated: ``(num_envs, per_env)`` bool: ``next_obs`` is terminal.
      writes: int32 scalar, columns written so far (the next column is
        ``writes % per_env``).
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    terminated: jax.Array
    writes: jax.Array

    @property
    def num_envs(self) -> int:
        return self.action.shape[-2]

    @property
    def per_env(self) -> int:
        return self.action.shape[-1]

    @property
    def capacity(self) -> int:
        return self.num_envs * self.per_env


def ring_init(capacity: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype=jnp.float32):
    """An empty ring of ``capacity // num_envs`` transitions per environment.

    Raises:
      ValueError: ``capacity`` below ``num_envs``, or a bad shape.
    """
    for name, value in (("capacity", capacity), ("num_envs", num_envs)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if capacity < num_envs:
        raise ValueError(f"capacity must be at least num_envs ({num_envs}), got {capacity}")
    obs_shape = tuple(obs_shape)
    if not obs_shape or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in obs_shape):
        raise ValueError(f"obs_shape must be one or more positive integers, got {obs_shape}")
    per_env = capacity // num_envs
    shape = (num_envs, per_env)
    return TransitionRing(
        obs=jnp.zeros((*shape, *obs_shape), obs_dtype),
        action=jnp.zeros(shape, jnp.int32),
        reward=jnp.zeros(shape, jnp.float32),
        next_obs=jnp.zeros((*shape, *obs_shape), obs_dtype),
        terminated=jnp.zeros(shape, bool),
        writes=jnp.zeros((), jnp.int32),
    )


def ring_size(ring: TransitionRing) -> jax.Array:
    """Transitions held, over all environments (int32 scalar)."""
    return jnp.minimum(ring.writes, ring.per_env) * ring.num_envs


def ring_add(ring: TransitionRing, batch: Batch) -> TransitionRing:
    """Writes one step of every environment (``batch`` fields of leading size ``num_envs``)."""
    column = ring.writes % ring.per_env

    def put(store: jax.Array, value: Any) -> jax.Array:
        return store.at[:, column].set(jnp.asarray(value, store.dtype))

    return TransitionRing(
        obs=put(ring.obs, batch.obs),
        action=put(ring.action, batch.action),
        reward=put(ring.reward, batch.reward),
        next_obs=put(ring.next_obs, batch.next_obs),
        terminated=put(ring.terminated, batch.terminated),
        writes=ring.writes + 1,
    )


def ring_sample(ring: TransitionRing, key: jax.Array, batch_size: int) -> Batch:
    """``batch_size`` transitions drawn uniformly with replacement (the ring must hold some)."""
    env_key, column_key = jax.random.split(key)
    filled = jnp.minimum(ring.writes, ring.per_env)
    env = jax.random.randint(env_key, (batch_size,), 0, ring.num_envs)
    column = jax.random.randint(column_key, (batch_size,), 0, jnp.maximum(filled, 1))
    return Batch(
        obs=ring.obs[env, column],
        action=ring.action[env, column],
        reward=ring.reward[env, column],
        next_obs=ring.next_obs[env, column],
        terminated=ring.terminated[env, column],
    )
