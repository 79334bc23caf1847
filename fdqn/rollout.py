"""Stepping N environments at once with the jitted epsilon-greedy policy.

Each :meth:`Rollout.step` is one jit-compiled call that computes the Q-values
and actions of all environments (and advances the PRNG key), one step of the
vector env, and one batched write to the replay memory. No per-environment
Python loop. Other work (the learner's updates) can run while the
environments step.

Counting: one *agent step* is one step of one environment (``frameskip``
emulator frames on Atari). A step of ``num_envs`` environments is
``num_envs`` agent steps; :attr:`Rollout.agent_steps` counts them, including
the steps that only reset an environment after its episode ended.
"""

import functools
from collections.abc import Callable
from typing import Any, Protocol

import chex
import gymnasium as gym
import jax
import numpy as np

from fdqn.envs import episode_stats
from fdqn.exploration import check_epsilon, select_actions

# The PRNG a rollout explores with. "rbg" keys draw their random bits with XLA's
# RngBitGenerator, which makes one epsilon-greedy step on the CPU about 3x
# cheaper than with JAX's default threefry keys (for a 64-64 MLP and one env,
# 28 against 98 us a call, most of the acting time of a small network). Their
# streams repeat for a given seed, backend and jaxlib, but not across them.
KEY_IMPL = "rbg"
# checkpoints written before rollouts recorded their key's PRNG hold threefry keys
_OLD_KEY_IMPL = "threefry2x32"


class Memory(Protocol):
    """What the rollout needs of a replay memory (``fdqn.ReplayMemory`` has it)."""

    def start(self, obs: np.ndarray) -> None: ...

    def add(self, action, reward, next_obs, terminated, autoreset) -> None: ...


@functools.partial(jax.jit, static_argnums=0)
def _act(q_fn: Callable, params: Any, key: jax.Array, obs: jax.Array, epsilon: chex.Numeric):
    key, use = jax.random.split(key)
    return key, select_actions(q_fn, params, use, obs, epsilon)


class Rollout:
    """Collects experience from a vector env into a replay memory.

    Args:
      env: a vector env from :func:`fdqn.envs.make` (next-step autoreset,
        ``info["life_lost"]``, episode statistics).
      q_fn: ``q_fn(params, obs) -> (num_envs, num_actions)``.
      memory: where transitions go (``None`` to only act, e.g. to evaluate).
      seed: seeds the environments (env ``i`` gets ``seed + i``) and the
        exploration key (a :data:`KEY_IMPL` key).
      terminal_on_life_loss: store a lost life as a terminal transition (no
        bootstrap), as DQN on Atari does; the game itself goes on.
    """

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        q_fn: Callable,
        memory: Memory | None = None,
        *,
        seed: int = 0,
        terminal_on_life_loss: bool = True,
    ):
        self.env = env
        self.q_fn = q_fn
        self.memory = memory
        self.terminal_on_life_loss = terminal_on_life_loss
        self.num_envs = env.num_envs
        self.num_actions = int(env.single_action_space.n)
        self.key = jax.random.key(seed, impl=KEY_IMPL)
        self._rng = np.random.default_rng(seed)
        self.obs, _ = env.reset(seed=seed)
        self._ended = np.zeros(self.num_envs, bool)
        self.agent_steps = 0
        if memory is not None:
            memory.start(self.obs)

    @property
    def ended(self) -> np.ndarray:
        """Which environments ended a game on the last step (the next step resets them)."""
        return self._ended.copy()

    def step(
        self, params: Any, epsilon: float, during: Callable[[], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Acts in every environment once and records the transitions.

        Args:
          params: parameters for ``q_fn``.
          epsilon: exploration rate; at 1 the network is not evaluated.
          during: called once while the environments step, after the actions
            are chosen and before this step's transitions reach the replay
            memory (the training loop runs its updates there: with ale-py's
            vector env the emulators step on their own threads meanwhile).
            Envs without ``send``/``recv`` step first, then call it.

        Returns:
          ``(scores, lengths)`` of the games that ended on this step: true
          (unclipped, all-lives) scores and lengths in agent steps; usually empty.
        """
        check_epsilon(float(epsilon))  # a host value here, whatever its type
        if epsilon == 1.0:
            actions = self._rng.integers(0, self.num_actions, self.num_envs, dtype=np.int32)
        else:
            self.key, actions = _act(self.q_fn, params, self.key, self.obs, epsilon)
            actions = np.asarray(actions)
        if during is None:
            return self._record(actions, *self.env.step(actions))
        if not hasattr(self.env, "recv"):
            outputs = self.env.step(actions)
            during()
            return self._record(actions, *outputs)
        self.env.send(actions)
        try:
            during()
        finally:  # even if ``during`` fails, the step is finished and recorded
            outputs = self.env.recv()
            stats = self._record(actions, *outputs)
        return stats

    def _record(self, actions, next_obs, reward, terminated, truncated, info):
        if self.memory is not None:
            terminal = terminated
            if self.terminal_on_life_loss:
                terminal = terminated | info["life_lost"]
            self.memory.add(actions, reward, next_obs, terminal, self._ended)
        self._ended = terminated | truncated
        self.obs = next_obs
        self.agent_steps += self.num_envs
        return episode_stats(info)

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The rollout's own state as ``(arrays, plain data)``, for checkpoints."""
        arrays = {
            "rollout/key": np.asarray(jax.random.key_data(self.key)),
            "rollout/obs": np.asarray(self.obs),
            "rollout/ended": self._ended.copy(),
        }
        data = {
            "agent_steps": self.agent_steps,
            "rng": self._rng.bit_generator.state,
            "key_impl": str(jax.random.key_impl(self.key)),
        }
        return arrays, data

    def load_state_dict(self, arrays: dict[str, np.ndarray], data: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (the env must be restored separately)."""
        obs = arrays["rollout/obs"]
        if obs.shape != np.shape(self.obs) or obs.dtype != np.asarray(self.obs).dtype:
            raise ValueError(
                f"saved observations have shape {obs.shape} {obs.dtype}, this env gives "
                f"{np.shape(self.obs)} {np.asarray(self.obs).dtype}"
            )
        impl = data.get("key_impl", _OLD_KEY_IMPL)
        try:
            self.key = jax.random.wrap_key_data(arrays["rollout/key"], impl=impl)
        except (TypeError, ValueError):  # JAX's own message is long and names internals
            raise ValueError(
                f"saved exploration key of shape {arrays['rollout/key'].shape} "
                f"is not a valid {impl!r} PRNG key"
            ) from None
        self.obs = obs
        self._ended = arrays["rollout/ended"].astype(bool)
        self.agent_steps = int(data["agent_steps"])
        self._rng.bit_generator.state = data["rng"]

    def restart(self, seed: int) -> None:
        """Resets every environment (new games), keeping counters; for envs without saved state.

        The replay memory is told that new episodes begin, so no transition
        links the old observations to the new ones.
        """
        self.obs, _ = self.env.reset(seed=seed)
        self._ended = np.zeros(self.num_envs, bool)
        if self.memory is not None:
            self.memory.start(self.obs)
