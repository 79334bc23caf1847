"""Environments stepped inside compiled code, batched, for runs compiled whole inside ``lax.scan``.

Three kinds share one interface (``reset(key) -> (obs, state)``,
``step(key, state, action) -> EnvStep``, ``num_envs``, ``obs_shape``,
``num_actions``, ``frame_stack``):

- :class:`JaxVecEnv`: JAX-native environments through gymnax, whose state is
  a pytree of arrays;
- :class:`AtariXlaEnv`: Atari through ale-py's ``AtariVectorEnv.xla()``, the
  emulators on the host behind an XLA custom call; the state is its handle;
- :class:`CallbackVecEnv`: any other gymnasium vector env, through an
  ordered ``io_callback`` to the host.

gymnax is an optional dependency (``pip install -e ".[gymnax]"``): it is
imported when an environment is made, and fdqn's other environments need
none of it. :class:`JaxVecEnv` steps ``num_envs`` copies of one gymnax
environment as one batch with ``jax.vmap``; its functions are pure and take
the environment state as an argument, so the state travels in the scan's
carry and a resumed run continues it exactly.

**gymnax.** gymnax resets an ended episode in the same step: the step returns the first
observation of the new episode, with the last one of the ended episode in
``final_obs``. ``terminated`` (the episode reached a terminal state: no
bootstrap) and ``truncated`` (it hit the time limit) are told apart, as
gymnasium does.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

# the gymnax environments the compiled run supports: classic control (gymnax's
# ids are gymnasium's too), vector observations for fdqn's mlp network; and the
# MinAtar games (gymnax only), 10x10 grids of 0/1 channels for its minatar network
CLASSIC_IDS = ("CartPole-v1", "Acrobot-v1", "MountainCar-v0")
MINATAR_IDS = (
    "Breakout-MinAtar", "Asterix-MinAtar", "Freeway-MinAtar", "Seaquest-MinAtar",
    "SpaceInvaders-MinAtar",
)  # fmt: skip
GYMNAX_IDS = CLASSIC_IDS + MINATAR_IDS


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
      reward: ``(num_envs,)`` float32, the reward learning sees (clipped to
        its sign on Atari).
      score: ``(num_envs,)`` float32, the game's own reward, summed into the
        reported episode returns.
      terminated: ``(num_envs,)`` bool, the transition is terminal for
        learning (a terminal state, or on Atari a lost life if so asked).
      truncated: ``(num_envs,)`` bool, the time limit was reached.
      done: ``(num_envs,)`` bool, the episode (the whole game) ended here.
      valid: ``(num_envs,)`` bool, the step is a transition; False where it
        only reset an environment whose episode ended on the step before
        (next-step autoreset), so its action was ignored.
      state: the environments' new state.
    """

    obs: jax.Array
    final_obs: jax.Array
    reward: jax.Array
    score: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    done: jax.Array
    valid: jax.Array
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
    frame_stack = 0  # whole transitions in the replay

    @property
    def replay_dtype(self):
        """How the replay stores observations: MinAtar's 0/1 grids as uint8 (4x smaller)."""
        return jnp.uint8 if self.env_id in MINATAR_IDS else jnp.float32

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
        terminated = terminated.astype(bool)
        reward = reward.astype(jnp.float32)
        return EnvStep(
            obs=obs.astype(jnp.float32),
            final_obs=info["final_observation"].astype(jnp.float32),
            reward=reward,
            score=reward,
            terminated=terminated,
            truncated=jnp.logical_and(truncated, jnp.logical_not(terminated)),
            done=terminated | truncated.astype(bool),
            valid=jnp.ones_like(terminated),
            state=state,
        )

    def resized(self, num_envs: int) -> "JaxVecEnv":
        """The same environment, ``num_envs`` of them (for evaluation)."""
        return dataclasses.replace(self, num_envs=num_envs)

    @property
    def max_episode_steps(self) -> int:
        return int(getattr(self.params, "max_steps_in_episode", 100_000))


def is_jax_env(env_id: str) -> bool:
    """Whether ``env_id`` is one of the JAX-native environments fdqn supports."""
    return env_id in GYMNAX_IDS


def is_minatar(env_id: str) -> bool:
    """Whether ``env_id`` is a MinAtar game (gymnax only: compiled runs only)."""
    return env_id in MINATAR_IDS


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


class AtariXlaState(NamedTuple):
    """The state of an :class:`AtariXlaEnv` in the carry.

    Attributes:
      handle: ale-py's handle of its vector of emulators (uint8 bytes); the
        emulators themselves live on the host, so a state is only good for
        the environment object that made it, and the latest one.
      lives: ``(num_envs,)`` int32 lives after the last step.
      ended: ``(num_envs,)`` bool, the game ended on the last step: this
        step resets it.
    """

    handle: jax.Array
    lives: jax.Array
    ended: jax.Array


def _blocks_of(key: jax.Array, num_envs: int) -> jax.Array:
    """``key`` as a vector of ``B`` keys, one per block of ``num_envs // B`` envs."""
    keys = key.reshape(-1)
    if num_envs % keys.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys do not split {num_envs} envs into equal blocks")
    return keys


def _block_seeds(key: jax.Array, num_envs: int) -> jax.Array:
    """``(num_envs,)`` int32 seeds: each key's block drawn as one key draws a whole env's."""
    keys = _blocks_of(key, num_envs)
    per = num_envs // keys.shape[0]
    draw = jax.vmap(lambda k: jax.random.randint(k, (per,), 0, 2**31 - 1, dtype=jnp.int32))
    return draw(keys).reshape(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class AtariXlaEnv:
    """``num_envs`` Atari games through ale-py's XLA custom calls, stepped in compiled code.

    The preprocessing of :func:`fdqn.envs.make` (no-ops and FIRE on reset,
    frame skip with max-pooling, 84x84 grayscale, a stack of frames zero-
    padded at an episode's start), run by ale-py's ``AtariVectorEnv`` on its
    threads. Its autoreset is next-step: the step after a game ends only
    resets it (``valid`` False, the action ignored). A lost life is terminal
    for learning when ``terminal_on_life_loss``; the reported scores are the
    games' own, over all lives. Hashed by identity (a static argument of
    ``jit``). Made by :func:`make_atari`.
    """

    env_id: str
    num_envs: int
    obs_shape: tuple[int, ...]
    num_actions: int
    frame_stack: int
    clip_rewards: bool
    terminal_on_life_loss: bool
    max_episode_steps: int
    options: dict = dataclasses.field(repr=False)  # make_atari's keywords, for resized()
    vector_env: Any = dataclasses.field(repr=False)
    handle: Any = dataclasses.field(repr=False)
    xla_reset: Any = dataclasses.field(repr=False)
    xla_step: Any = dataclasses.field(repr=False)

    def reset(self, key: jax.Array) -> tuple[jax.Array, AtariXlaState]:
        """Starts every game anew; uint8 stacks and the state.

        The games' seeds are drawn from ``key``; given ``B`` keys, each seeds a
        block of ``num_envs // B`` games as one key seeds an env of that many.
        """
        seeds = _block_seeds(key, self.num_envs)
        handle, (obs, info) = self.xla_reset(self.handle, seed=seeds)
        lives = info["lives"].astype(jnp.int32)
        return obs, AtariXlaState(handle, lives, jnp.zeros(self.num_envs, bool))

    def step(self, key: jax.Array, state: AtariXlaState, action: jax.Array) -> EnvStep:
        """One agent step of every game (``key`` unused: the emulators keep their own)."""
        del key
        handle, (obs, reward, terminated, truncated, info) = self.xla_step(
            state.handle, action.astype(jnp.int32)
        )
        valid = ~state.ended
        lives = info["lives"].astype(jnp.int32)
        terminated = terminated.astype(bool) & valid
        truncated = truncated.astype(bool) & valid & ~terminated
        score = jnp.where(valid, reward.astype(jnp.float32), 0.0)
        learn_terminal = terminated
        if self.terminal_on_life_loss:
            learn_terminal = terminated | (valid & (lives < state.lives))
        done = terminated | truncated
        return EnvStep(
            obs=obs,
            final_obs=obs,
            reward=jnp.sign(score) if self.clip_rewards else score,
            score=score,
            terminated=learn_terminal,
            truncated=truncated,
            done=done,
            valid=valid,
            state=AtariXlaState(handle, lives, done),
        )

    def resized(self, num_envs: int) -> "AtariXlaEnv":
        """Another set of ``num_envs`` such games (for evaluation), with emulators of its own."""
        return make_atari(self.env_id, num_envs, **self.options)


def make_atari(
    env_id: str,
    num_envs: int,
    *,
    repeat_action_probability: float | None = None,
    terminal_on_life_loss: bool = True,
    clip_rewards: bool = True,
    noop_max: int = 30,
    frameskip: int = 4,
    stack: int = 4,
    max_episode_frames: int = 108_000,
    num_threads: int = 0,
) -> AtariXlaEnv:
    """``num_envs`` games of the Atari id ``env_id`` for compiled runs.

    The arguments mean what they mean for :func:`fdqn.envs.make`; sticky
    actions default to the id's.

    Raises:
      ValueError: not an Atari id, or a bad value.
    """
    from fdqn import envs  # ale-py is imported here, on first use

    spec = envs.parse_atari_id(env_id)
    if spec is None:
        raise ValueError(f"{env_id!r} is not an Atari game id (see fdqn.envs.list_env_ids())")
    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    options = dict(
        repeat_action_probability=repeat_action_probability,
        terminal_on_life_loss=terminal_on_life_loss,
        clip_rewards=clip_rewards,
        noop_max=noop_max,
        frameskip=frameskip,
        stack=stack,
        max_episode_frames=max_episode_frames,
        num_threads=num_threads,
    )
    vector_env = envs.atari_vector_env(
        spec,
        num_envs,
        repeat_action_probability=repeat_action_probability,
        noop_max=noop_max,
        frameskip=frameskip,
        stack=stack,
        max_episode_frames=max_episode_frames,
        num_threads=num_threads,
    )
    handle, xla_reset, xla_step = vector_env.xla()
    return AtariXlaEnv(
        env_id=env_id,
        num_envs=num_envs,
        obs_shape=tuple(int(d) for d in vector_env.single_observation_space.shape),
        num_actions=int(vector_env.single_action_space.n),
        frame_stack=stack,
        clip_rewards=clip_rewards,
        terminal_on_life_loss=terminal_on_life_loss,
        max_episode_steps=-(-max_episode_frames // frameskip),
        options=options,
        vector_env=vector_env,
        handle=handle,
        xla_reset=xla_reset,
        xla_step=xla_step,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class CallbackVecEnv:
    """Any gymnasium vector env with vector observations, stepped from compiled code.

    Each step is an ordered ``jax.experimental.io_callback`` to a synchronous
    gymnasium vector env on the host, in same-step autoreset mode (a step
    that ends an episode returns the next one's first observation, and the
    last one in ``final_obs``), so the replay takes whole transitions as for
    gymnax. The env's state lives on the host; the carry holds a step count
    that orders the calls. Being ordered, the calls cannot be ``vmap``-ped:
    several seeds share one such env, a block of envs each (:meth:`reset`
    takes a key per block). Hashed by identity. Made by :func:`make_callback`.
    """

    env_id: str
    num_envs: int
    obs_shape: tuple[int, ...]
    num_actions: int
    max_episode_steps: int
    vector_env: Any = dataclasses.field(repr=False)
    frame_stack = 0

    def _host_reset(self, starts):
        per = self.num_envs // len(starts)
        obs, _ = self.vector_env.reset(seed=[int(s) + i for s in starts for i in range(per)])
        return np.asarray(obs, np.float32)

    def _host_step(self, action):
        obs, reward, terminated, truncated, info = self.vector_env.step(np.asarray(action))
        obs = np.asarray(obs, np.float32)
        final = obs.copy()
        if "_final_obs" in info:
            for i in np.flatnonzero(info["_final_obs"]):
                final[i] = info["final_obs"][i]
        terminated = np.asarray(terminated, bool)
        truncated = np.asarray(truncated, bool) & ~terminated
        return obs, final, np.asarray(reward, np.float32), terminated, truncated

    def reset(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """First observations and the step count 0.

        The host env is seeded from ``key`` as gymnasium seeds from one
        integer ``s`` (``s, s + 1, ...``); given ``B`` keys, each seeds a block
        of ``num_envs // B`` envs so.
        """
        draw = jax.vmap(lambda k: jax.random.randint(k, (), 0, 2**31 - 1, dtype=jnp.int32))
        starts = draw(_blocks_of(key, self.num_envs))
        shape = jax.ShapeDtypeStruct((self.num_envs, *self.obs_shape), jnp.float32)
        obs = io_callback(self._host_reset, shape, starts, ordered=True)
        return obs, jnp.zeros((), jnp.int32)

    def step(self, key: jax.Array, state: jax.Array, action: jax.Array) -> EnvStep:
        """One step of every environment on the host (``key`` unused: the env seeds itself)."""
        del key
        n = self.num_envs
        obs = jax.ShapeDtypeStruct((n, *self.obs_shape), jnp.float32)
        flag = jax.ShapeDtypeStruct((n,), jnp.bool_)
        shapes = (obs, obs, jax.ShapeDtypeStruct((n,), jnp.float32), flag, flag)
        obs, final_obs, reward, terminated, truncated = io_callback(
            self._host_step, shapes, action.astype(jnp.int32), ordered=True
        )
        return EnvStep(
            obs=obs,
            final_obs=final_obs,
            reward=reward,
            score=reward,
            terminated=terminated,
            truncated=truncated,
            done=terminated | truncated,
            valid=jnp.ones(n, bool),
            state=state + 1,
        )

    def resized(self, num_envs: int) -> "CallbackVecEnv":
        """Another ``num_envs`` such environments on the host (for evaluation)."""
        return make_callback(self.env_id, num_envs)


def make_callback(env_id: str, num_envs: int) -> CallbackVecEnv:
    """``num_envs`` gymnasium environments ``env_id`` behind ordered host callbacks.

    Raises:
      ValueError: an unknown id, a bad ``num_envs``, or spaces other than a
        discrete action space and a vector observation space.
    """
    import gymnasium as gym

    from fdqn import envs

    if not isinstance(num_envs, int) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    envs.check_env_id(env_id)  # a known id with a discrete action space
    if envs.is_atari(env_id):
        raise ValueError(f"{env_id} is Atari: use make_atari (ale-py's XLA calls)")
    vector_env = gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
    )
    obs_space, action_space = vector_env.single_observation_space, vector_env.single_action_space
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"{env_id}: compiled runs take vector observations, got {obs_space}")
    limit = getattr(vector_env.envs[0].spec, "max_episode_steps", None) or 100_000
    return CallbackVecEnv(
        env_id=env_id,
        num_envs=num_envs,
        obs_shape=tuple(int(d) for d in obs_space.shape),
        num_actions=int(action_space.n),
        max_episode_steps=int(limit),
        vector_env=vector_env,
    )
