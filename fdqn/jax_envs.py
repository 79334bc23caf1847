"""JAX-native environments (gymnax), batched, for runs compiled whole inside ``lax.scan``.

gymnax is an optional dependency (``pip install -e ".[gymnax]"``): it is
imported when an environment is made, and fdqn's other environments need
none of it. :class:`JaxVecEnv` steps ``num_envs`` copies of one gymnax
environment as one batch with ``jax.vmap``; its functions are pure and take
the environment state as an argument, so the state travels in the scan's
carry and a resumed run continues it exactly.

gymnax resets an ended episode in the same step: the step returns the first
observation of the new episode, with the last one of the ended episode in
``final_obs``. ``terminated`` (the episode reached a terminal state: no
bootstrap) and ``truncated`` (it hit the time limit) are told apart, as
gymnasium does.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# the gymnax environments the compiled run supports (gymnax's ids, gymnasium's
# too); they give vector observations, which fdqn's mlp network takes
GYMNAX_IDS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0")


class GymnaxMissing(ImportError):
    """gymnax is not installed."""


def _gymnax():
    try:
        import gymnax
    except ImportError as e:
        raise GymnaxMissing(
            f"JAX-native environments need gymnax ({e}): pip install -e '.[gymnax]'"
        ) from None
    return gymnax


class EnvStep(NamedTuple):
    """What one step of all environments returns.

    Attributes:
      obs: ``(num_envs, *obs_shape)`` observations to act on next (the
        first of a new episode where one ended).
      final_obs: ``(num_envs, *obs_shape)`` the observations the actions led
        to (before any reset): the ``next_obs`` of the transitions.
      reward: ``(num_envs,)`` float32.
      terminated: ``(num_envs,)`` bool, a terminal state was reached.
      truncated: ``(num_envs,)`` bool, the time limit was reached.
      state: the environments' new state.
    """

    obs: jax.Array
    final_obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    state: Any


@dataclasses.dataclass(frozen=True)
class JaxVecEnv:
    """``num_envs`` copies of a gymnax environment stepped as one batch (pure functions).

    Hashable and immutable, so it can be a static argument of ``jax.jit``.
    """

    env_id: str
    num_envs: int
    env: Any = dataclasses.field(compare=False, repr=False)
    params: Any = dataclasses.field(compare=False, repr=False)
    obs_shape: tuple[int, ...]
    num_actions: int

    def reset(self, key: jax.Array) -> tuple[jax.Array, Any]:
        """First observations ``(num_envs, *obs_shape)`` and states of new episodes."""
        keys = jax.random.split(key, self.num_envs)
        obs, state = jax.vmap(self.env.reset, in_axes=(0, None))(keys, self.params)
        return obs.astype(jnp.float32), state

    def step(self, key: jax.Array, state: Any, action: jax.Array) -> EnvStep:
        """One step of every environment, resetting those whose episode ended."""
        keys = jax.random.split(key, self.num_envs)
        obs, state, reward, terminated, truncated, info = jax.vmap(
            self.env.step, in_axes=(0, 0, 0, None)
        )(keys, state, action, self.params)
        return EnvStep(
            obs=obs.astype(jnp.float32),
            final_obs=info["final_observation"].astype(jnp.float32),
            reward=reward.astype(jnp.float32),
            terminated=terminated.astype(bool),
            truncated=jnp.logical_and(truncated, jnp.logical_not(terminated)),
            state=state,
        )


def is_jax_env(env_id: str) -> bool:
    """Whether ``env_id`` is one of the JAX-native environments fdqn supports."""
    return env_id in GYMNAX_IDS


def make(env_id: str, num_envs: int) -> JaxVecEnv:
    """A batch of ``num_envs`` gymnax environments ``env_id`` (one of :data:`GYMNAX_IDS`).

    Raises:
      ValueError: an id fdqn does not support, or a bad ``num_envs``.
      GymnaxMissing: gymnax is not installed.
    """
    if env_id not in GYMNAX_IDS:
        raise ValueError(f"unknown JAX env id {env_id!r}: one of {', '.join(GYMNAX_IDS)}")
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    env, params = _gymnax().make(env_id)
    obs_shape = tuple(int(d) for d in env.observation_space(params).shape)
    return JaxVecEnv(
        env_id=env_id,
        num_envs=num_envs,
        env=env,
        params=params,
        obs_shape=obs_shape,
        num_actions=int(env.action_space(params).n),
    )
