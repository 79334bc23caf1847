"""A replay buffer that is a pytree on the device, for training inside ``jax.lax.scan``.

:class:`TransitionRing` keeps whole transitions ``(obs, action, reward,
next_obs, terminated)`` in one ring per environment: arrays of shape
``(num_envs, per_env, ...)``, written one column per step for all
environments at once. Storing ``next_obs`` beside ``obs`` doubles the
observation memory, which is what lets environments that reset in the same
step (gymnax: the step returns the first observation of the next episode,
and the last one of the ended episode on the side) store every transition
in one write. For vector observations that is a few bytes per transition.

:class:`FrameRing` is its counterpart for frame-stacked Atari observations:
one frame per step and environment (7.1 KB per transition for 84x84
frames), the stacks rebuilt when sampled.

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


def _check_sizes(capacity: int, num_envs: int) -> None:
    for name, value in (("capacity", capacity), ("num_envs", num_envs)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if capacity < num_envs:
        raise ValueError(f"capacity must be at least num_envs ({num_envs}), got {capacity}")


def ring_init(capacity: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype=jnp.float32):
    """An empty ring of ``capacity // num_envs`` transitions per environment.

    Raises:
      ValueError: ``capacity`` below ``num_envs``, or a bad shape.
    """
    _check_sizes(capacity, num_envs)
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


class FrameRing(NamedTuple):
    """Replay of frame-stacked observations that keeps each frame once; a pytree.

    One ring of ``slots`` steps per environment, all written in step: the
    write of agent step ``t`` goes to column ``t % slots`` of every ring and
    holds the newest frame of the observation the step led to, the action
    that led there, its reward and ``terminated`` flag, and ``first``: the
    frame starts an episode (the step only reset the environment, so no
    transition ends there). The transition at time ``t`` goes from the stack
    of frames ``t - stack .. t - 1`` to that of ``t - stack + 1 .. t``; frames
    from before the episode's first come out as zeros, as the environment
    gives them after a reset. Each ring holds ``stack`` slots beyond its
    ``per_env`` transitions, so the oldest one still has its whole history.

    Attributes:
      frames: ``(num_envs, slots, *frame_shape)`` uint8.
      action: ``(num_envs, slots)`` int32.
      reward: ``(num_envs, slots)`` float32.
      terminated, first: ``(num_envs, slots)`` bool.
      writes: int32 scalar, the steps written so far (time of the next write).
    """

    frames: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    first: jax.Array
    writes: jax.Array

    @property
    def num_envs(self) -> int:
        return self.action.shape[-2]

    @property
    def slots(self) -> int:
        return self.action.shape[-1]


def frame_ring_init(capacity: int, num_envs: int, obs_shape: tuple[int, ...]) -> FrameRing:
    """An empty frame ring for ``capacity`` transitions of ``(stack, *frame_shape)`` uint8 stacks.

    Raises:
      ValueError: ``capacity`` below ``num_envs``, or a bad shape.
    """
    _check_sizes(capacity, num_envs)
    obs_shape = tuple(obs_shape)
    if len(obs_shape) < 2 or not all(
        isinstance(d, (int, np.integer)) and d >= 1 for d in obs_shape
    ):
        raise ValueError(f"obs_shape must be (stack, *frame_shape), got {obs_shape}")
    stack, *frame_shape = obs_shape
    shape = (num_envs, capacity // num_envs + stack)
    return FrameRing(
        frames=jnp.zeros((*shape, *frame_shape), jnp.uint8),
        action=jnp.zeros(shape, jnp.int32),
        reward=jnp.zeros(shape, jnp.float32),
        terminated=jnp.zeros(shape, bool),
        first=jnp.zeros(shape, bool),
        writes=jnp.zeros((), jnp.int32),
    )


def frame_ring_add(
    ring: FrameRing,
    next_obs: jax.Array,
    action: jax.Array,
    reward: jax.Array,
    terminated: jax.Array,
    first: jax.Array,
) -> FrameRing:
    """Writes one step of every environment: the newest frame of each ``next_obs`` stack.

    ``first`` marks the environments whose step only began a new episode
    (``next_obs`` is its first stack; ``action``, ``reward`` and
    ``terminated`` are then ignored by sampling). At time 0, the stacks of
    :meth:`reset` go in with ``first`` all True.
    """
    column = ring.writes % ring.slots

    def put(store: jax.Array, value: Any) -> jax.Array:
        return store.at[:, column].set(jnp.asarray(value, store.dtype))

    return FrameRing(
        frames=put(ring.frames, next_obs[:, -1]),
        action=put(ring.action, action),
        reward=put(ring.reward, reward),
        terminated=put(ring.terminated, terminated),
        first=put(ring.first, first),
        writes=ring.writes + 1,
    )


def _frame_window(ring: FrameRing, stack: int) -> tuple[jax.Array, jax.Array]:
    """The times ``lo .. writes - 1`` whose transitions have their whole history held."""
    lo = jnp.maximum(1, ring.writes - ring.slots + stack)
    return lo, jnp.maximum(ring.writes - lo, 0)


def frame_ring_size(ring: FrameRing, stack: int) -> jax.Array:
    """Times with a transition held, over all environments (int32; includes the resets)."""
    return _frame_window(ring, stack)[1] * ring.num_envs


# Rejection rounds of frame_ring_sample: each redraws only the draws that fell on
# a reset step, one step in an episode's length; 64 rounds leave one there with
# probability (its share of the buffer) ** 64.
_REJECTION_ROUNDS = 64


def frame_ring_sample(ring: FrameRing, key: jax.Array, batch_size: int, stack: int) -> Batch:
    """``batch_size`` transitions drawn uniformly with replacement among those held.

    Draws land uniformly on (environment, time) pairs; those on a reset
    step, which holds no transition, are drawn again (rejection sampling,
    in a ``lax.while_loop``), so the result is uniform over transitions.
    """
    lo, span = _frame_window(ring, stack)

    def draw(key, shape):
        env_key, time_key = jax.random.split(key)
        env = jax.random.randint(env_key, shape, 0, ring.num_envs)
        t = lo + jax.random.randint(time_key, shape, 0, jnp.maximum(span, 1))
        return env, t

    def rejected(env, t):
        return ring.first[env, t % ring.slots]

    def unfinished(carry):
        i, _, env, t = carry
        return (i < _REJECTION_ROUNDS) & jnp.any(rejected(env, t))

    def redraw(carry):
        i, key, env, t = carry
        key, sub = jax.random.split(key)
        new_env, new_t = draw(sub, env.shape)
        bad = rejected(env, t)
        return i + 1, key, jnp.where(bad, new_env, env), jnp.where(bad, new_t, t)

    key, sub = jax.random.split(key)
    env, t = draw(sub, (batch_size,))
    _, _, env, t = jax.lax.while_loop(unfinished, redraw, (0, key, env, t))
    return frame_ring_gather(ring, env, t, stack)


def frame_ring_gather(ring: FrameRing, env: jax.Array, t: jax.Array, stack: int) -> Batch:
    """The transitions at times ``t`` of environments ``env``, their stacks rebuilt."""
    window = (t[:, None] + jnp.arange(-stack, 1)) % ring.slots  # (batch, stack + 1)
    rows = env[:, None]
    frames = ring.frames[rows, window]  # (batch, stack + 1, *frame_shape)
    first = ring.first[rows, window]
    # a frame is kept if no episode starts after it within the window: a reversed
    # running "or" of the first flags from the frame after it on
    later = jnp.flip(jnp.cumsum(jnp.flip(first[:, 1:], axis=1), axis=1), axis=1) > 0
    keep = jnp.concatenate([~later, jnp.ones_like(first[:, :1])], axis=1)
    frames = jnp.where(keep.reshape(keep.shape + (1,) * (frames.ndim - 2)), frames, 0)
    column = t % ring.slots
    return Batch(
        obs=frames[:, :-1],
        action=ring.action[env, column],
        reward=ring.reward[env, column],
        next_obs=frames[:, 1:],
        terminated=ring.terminated[env, column],
    )
