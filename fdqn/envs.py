"""Vectorized environments: Atari through ale-py, everything else through gymnasium.

:func:`make` returns a gymnasium 1.x ``VectorEnv`` whose ``step`` gives
``(obs, reward, terminated, truncated, info)`` for all environments at once,
with next-step autoreset: an environment that ended on one step is reset by
the next, whose action is ignored and whose output begins a new episode.

What each field means, for Atari and classic control alike:

- ``reward``: the reward learning sees; on Atari clipped to its sign
  (``clip_rewards``), the unclipped one in ``info["raw_reward"]``.
- ``terminated`` / ``truncated``: the end of a whole game (all lives) and a
  time limit. Only termination stops bootstrapping.
- ``info["life_lost"]``: a life was lost on this step (all False where the
  game has no lives). DQN treats it as terminal for learning
  (``terminal_on_life_loss``) while the game, and its score, go on.
- ``info["episode"]`` / ``info["_episode"]``: on the step a game ends, its true
  score (sum of unclipped rewards over all lives) and length in agent steps,
  in the fields of gymnasium's ``RecordEpisodeStatistics``.

One agent step on Atari is ``frameskip`` (4) emulator frames.

A step can also be taken in two halves, ``env.send(actions)`` then
``env.recv()``: Atari environments step on ale-py's threads in between, while
the caller does other work.
"""

import dataclasses
import re
import time
from typing import Any

import gymnasium as gym
import numpy as np

STICKY_V5 = 0.25


def _rom_ids() -> list[str]:
    """The games ale-py ships; ale-py (the emulator) is imported here, on first use."""
    from ale_py import roms

    return roms.get_all_rom_ids()


@dataclasses.dataclass(frozen=True)
class AtariSpec:
    """How an Atari env id was understood.

    Attributes:
      game: the ale-py ROM name, snake_case (``"breakout"``).
      repeat_action_probability: sticky-action probability implied by the id
        (0.25 for ``ALE/...-v5``, 0 for ``...NoFrameskip-v4`` and bare names).
    """

    game: str
    repeat_action_probability: float


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def parse_atari_id(env_id: str) -> AtariSpec | None:
    """Reads an Atari env id in any of its usual spellings, or returns None.

    Accepted: ``"BreakoutNoFrameskip-v4"``, ``"Breakout-v4"``,
    ``"ALE/Breakout-v5"``, ``"breakout"``, ``"Breakout"``, for any ROM that
    ale-py ships (``ale_py.roms.get_all_rom_ids()``).
    """
    match = re.fullmatch(
        r"(?:ALE/)?([A-Za-z0-9_]+?)(NoFrameskip|Deterministic)?(?:-v(\d+))?", env_id
    )
    if match is None:
        return None
    name, _, version = match.groups()
    game = name if "_" in name or name.islower() else _snake_case(name)
    if game not in _rom_ids():
        return None
    sticky = STICKY_V5 if version == "5" else 0.0
    return AtariSpec(game=game, repeat_action_probability=sticky)


def list_env_ids() -> list[str]:
    """Env ids :func:`make` accepts: ale-py's games (bare names) and gymnasium's registry."""
    atari = sorted(_rom_ids())
    registered = sorted(k for k in gym.registry if not k.startswith("ALE/"))
    return atari + registered


def check_env_id(env_id: str) -> bool:
    """Raises a one-line ValueError unless :func:`make` accepts ``env_id``; True for Atari."""
    if parse_atari_id(env_id) is not None:
        return True
    if env_id not in gym.registry:
        raise ValueError(
            f"unknown env id {env_id!r}: use an Atari game ale-py ships ('breakout', "
            f"'BreakoutNoFrameskip-v4', 'ALE/Breakout-v5') or a gymnasium id such as "
            f"'CartPole-v1'; fdqn.envs.list_env_ids() lists them"
        )
    probe = gym.make(env_id)
    space = probe.action_space
    probe.close()
    if not isinstance(space, gym.spaces.Discrete):
        raise ValueError(f"{env_id} has action space {space}; DQN needs a Discrete one")
    return False


def is_atari(env_id: str) -> bool:
    """Whether ``env_id`` names an Atari game ale-py ships."""
    return parse_atari_id(env_id) is not None


class _StepWrapper(gym.vector.VectorWrapper):
    """A wrapper that edits each step's outputs, for whole steps and for split ones.

    ``send(actions)`` starts a step and ``recv()`` finishes it. In between,
    ale-py's ``AtariVectorEnv`` runs the step on its own threads and the
    caller is free to do other work (``fdqn.Rollout`` runs the learner's
    updates there). Environments that cannot split a step (gymnasium's
    synchronous vector envs) take the whole step at ``recv()``.
    """

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self._unsent = None  # actions of a split step, for envs that step whole

    def _outputs(self, obs, reward, terminated, truncated, info):
        """This wrapper's edit of a step's ``(obs, reward, terminated, truncated, info)``."""
        raise NotImplementedError

    def step(self, actions):
        return self._outputs(*self.env.step(actions))

    def send(self, actions) -> None:
        """Starts a step with ``actions``; :meth:`recv` gives its outputs."""
        if hasattr(self.env, "recv"):
            self.env.send(actions)
        else:
            self._unsent = actions

    def recv(self):
        """Finishes the step :meth:`send` started; returns what :meth:`step` returns."""
        if hasattr(self.env, "recv"):
            return self._outputs(*self.env.recv())
        if self._unsent is None:
            raise RuntimeError("recv() without a send() before it")
        actions, self._unsent = self._unsent, None
        return self._outputs(*self.env.step(actions))


class _LifeLossInfo(_StepWrapper):
    """Adds ``info["life_lost"]``: True where ``info["lives"]`` dropped on this step."""

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._lives = np.asarray(info["lives"]).copy()
        info["life_lost"] = np.zeros(self.num_envs, bool)
        return obs, info

    def _outputs(self, obs, reward, terminated, truncated, info):
        lives = np.asarray(info["lives"])
        info["life_lost"] = lives < self._lives
        self._lives = lives.copy()
        return obs, reward, terminated, truncated, info


class _EpisodeStatistics(_StepWrapper):
    """Adds ``info["episode"]`` and ``info["_episode"]`` on the steps games end.

    The fields and meaning of gymnasium's ``RecordEpisodeStatistics`` for a
    next-step-autoreset env (``"r"``: sum of rewards, ``"l"``: length in
    steps, ``"t"``: seconds, each where ``"_episode"`` is True, zeros
    elsewhere), with a fraction of its per-step work: on most steps no
    environment ends or resets and the counters advance with two additions.
    """

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, np.int64)
        self._starts = np.full(self.num_envs, time.perf_counter())
        self._ended = np.zeros(self.num_envs, bool)
        return obs, info

    def _outputs(self, obs, reward, terminated, truncated, info):
        if np.count_nonzero(self._ended):  # this step only reset those envs: their counts restart
            restart = self._ended
            self._returns[restart] = 0.0
            self._lengths[restart] = 0
            self._starts[restart] = time.perf_counter()
            self._returns[~restart] += reward[~restart]
            self._lengths[~restart] += 1
        else:
            self._returns += reward
            self._lengths += 1
        self._ended = ended = np.logical_or(terminated, truncated)
        if np.count_nonzero(ended):
            if "episode" in info or "_episode" in info:
                raise ValueError("info already has episode statistics: wrap the env only once")
            seconds = np.round(time.perf_counter() - self._starts, 6)
            info["episode"] = {
                "r": np.where(ended, self._returns, 0.0),
                "l": np.where(ended, self._lengths, 0),
                "t": np.where(ended, seconds, 0.0),
            }
            info["_episode"] = ended
        return obs, reward, terminated, truncated, info


class _NoLives(_StepWrapper):
    """Gives environments without lives an all-False ``info["life_lost"]``."""

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        info["life_lost"] = np.zeros(self.num_envs, bool)
        return obs, info

    def _outputs(self, obs, reward, terminated, truncated, info):
        info["life_lost"] = np.zeros(self.num_envs, bool)
        return obs, reward, terminated, truncated, info


class _LearningReward(_StepWrapper):
    """Float32 rewards, clipped to their sign if asked; raw ones in ``info["raw_reward"]``."""

    def __init__(self, env: gym.vector.VectorEnv, clip: bool):
        super().__init__(env)
        self._clip = clip

    def reset(self, *, seed=None, options=None):
        return self.env.reset(seed=seed, options=options)

    def _outputs(self, obs, reward, terminated, truncated, info):
        info["raw_reward"] = reward
        reward = np.sign(reward) if self._clip else reward
        return obs, np.asarray(reward, np.float32), terminated, truncated, info


def make(
    env_id: str,
    num_envs: int = 1,
    *,
    clip_rewards: bool = True,
    repeat_action_probability: float | None = None,
    noop_max: int = 30,
    frameskip: int = 4,
    stack: int = 4,
    max_episode_frames: int = 108_000,
    num_threads: int = 0,
) -> gym.vector.VectorEnv:
    """Makes ``num_envs`` copies of an environment, stepped as one batch.

    Atari games run in ale-py's C++ ``AtariVectorEnv`` with the DeepMind
    preprocessing of Mnih et al. (2015): up to ``noop_max`` no-ops on reset,
    FIRE on reset where the game needs it, each action repeated for
    ``frameskip`` frames with the maximum of the last two, 84x84 grayscale, a
    stack of ``stack`` frames (zeros before an episode's first frame), and
    uint8 observations of shape ``(num_envs, stack, 84, 84)``. Other ids are
    made with ``gymnasium.make_vec`` (synchronous) and must have a discrete
    action space.

    Seed with ``env.reset(seed=s)``: environment ``i`` gets seed ``s + i``.

    Args:
      env_id: ``"BreakoutNoFrameskip-v4"``, ``"ALE/Breakout-v5"``,
        ``"breakout"``, ``"CartPole-v1"``, ... (see :func:`list_env_ids`).
      num_envs: number of environments; positive.
      clip_rewards: Atari only: return rewards clipped to their sign.
      repeat_action_probability: Atari sticky actions; default from the id
        (0.25 for ``-v5``, 0 otherwise, the v4 behaviour).
      noop_max, frameskip, stack, max_episode_frames, num_threads: Atari
        preprocessing, the episode time limit in emulator frames (truncation)
        and ale-py's worker threads (0: one per environment, up to the cores).

    Returns:
      A gymnasium ``VectorEnv`` with the fields described in this module.
    """
    if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    spec = parse_atari_id(env_id)
    if spec is not None:
        env = atari_vector_env(
            spec,
            int(num_envs),
            repeat_action_probability=repeat_action_probability,
            noop_max=noop_max,
            frameskip=frameskip,
            stack=stack,
            max_episode_frames=max_episode_frames,
            num_threads=num_threads,
        )
        return _LearningReward(_EpisodeStatistics(_LifeLossInfo(env)), clip=clip_rewards)
    check_env_id(env_id)
    env = gym.make_vec(env_id, num_envs=int(num_envs), vectorization_mode="sync")
    return _LearningReward(_NoLives(_EpisodeStatistics(env)), clip=False)


def atari_vector_env(
    spec: AtariSpec,
    num_envs: int,
    *,
    repeat_action_probability: float | None,
    noop_max: int,
    frameskip: int,
    stack: int,
    max_episode_frames: int,
    num_threads: int,
):
    """ale-py's ``AtariVectorEnv`` with the preprocessing :func:`make` describes, unwrapped:
    raw rewards, no life-loss signal of its own, sticky actions by default from the id."""
    sticky = spec.repeat_action_probability
    if repeat_action_probability is not None:
        sticky = repeat_action_probability
    if not 0.0 <= sticky <= 1.0:
        raise ValueError(f"repeat_action_probability must be in [0, 1], got {sticky}")
    from ale_py.vector_env import AtariVectorEnv

    return AtariVectorEnv(
        spec.game,
        num_envs,
        num_threads=num_threads,
        repeat_action_probability=sticky,
        noop_max=noop_max,
        frameskip=frameskip,
        stack_num=stack,
        max_num_frames_per_episode=max_episode_frames,
        episodic_life=False,
        life_loss_info=False,
        reward_clipping=False,
        use_fire_reset=True,
    )


def episode_stats(info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """True scores and lengths of the games that ended on this step (possibly none)."""
    if "_episode" not in info:
        return np.zeros(0, np.float64), np.zeros(0, np.int64)
    done = np.asarray(info["_episode"])
    return np.asarray(info["episode"]["r"])[done], np.asarray(info["episode"]["l"])[done]


# -- saving and restoring environment state (for exact resumption) -------------


class _Unsupported(Exception):
    pass


def _encode(value: Any) -> Any:
    """A JSON form of plain state (numbers, arrays, generators), or _Unsupported."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return {"__array__": value.tolist(), "dtype": value.dtype.str, "shape": []}
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"__array__": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.random.Generator):
        return {"__generator__": value.bit_generator.state}
    if isinstance(value, (list, tuple)):
        return {"__seq__": [_encode(v) for v in value], "tuple": isinstance(value, tuple)}
    raise _Unsupported


def _decode(value: Any, current: Any) -> Any:
    if isinstance(value, dict) and "__array__" in value:
        array = np.array(value["__array__"], dtype=np.dtype(value["dtype"]))
        array = array.reshape(value["shape"])
        return array[()] if not value["shape"] and isinstance(current, np.generic) else array
    if isinstance(value, dict) and "__generator__" in value:
        current.bit_generator.state = value["__generator__"]
        return current
    if isinstance(value, dict) and "__seq__" in value:
        saved = value["__seq__"]
        olds = list(current) if isinstance(current, (list, tuple)) else [None] * len(saved)
        items = [_decode(v, c) for v, c in zip(saved, olds)]
        return tuple(items) if value["tuple"] else items
    return value


def _object_state(obj: Any) -> dict[str, Any]:
    state = {}
    for name, value in vars(obj).items():
        if name in ("env", "envs", "metadata", "spec", "render_mode"):
            continue
        try:
            state[name] = _encode(value)
        except _Unsupported:
            continue
    return state


def _restore_object(obj: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if hasattr(obj, name):
            setattr(obj, name, _decode(value, getattr(obj, name)))


def _chain(env: Any) -> list[Any]:
    """The wrapper chain of an env, outermost first, down to the unwrapped env."""
    objects = [env]
    while hasattr(objects[-1], "env") and objects[-1].env is not objects[-1]:
        objects.append(objects[-1].env)
    return objects


def get_state(env: gym.vector.VectorEnv) -> dict[str, Any] | None:
    """The state of a gymnasium sync vector env and its wrappers, as JSON-able data.

    Covers environments whose state is plain data (classic control: CartPole,
    Acrobot, MountainCar, ...). Returns None for Atari, whose emulator state
    ale-py's vector env does not expose: a resumed Atari run starts new games.
    """
    chain = _chain(env)
    base = chain[-1]
    if not isinstance(base, gym.vector.SyncVectorEnv):
        return None
    return {
        "vector": [_object_state(obj) for obj in chain],
        "envs": [[_object_state(obj) for obj in _chain(sub)] for sub in base.envs],
    }


def set_state(env: gym.vector.VectorEnv, state: dict[str, Any]) -> None:
    """Restores what :func:`get_state` returned into an env made with the same arguments."""
    chain = _chain(env)
    base = chain[-1]
    if not isinstance(base, gym.vector.SyncVectorEnv) or len(state["vector"]) != len(chain):
        raise ValueError("the saved environment state does not fit this environment")
    if len(state["envs"]) != len(base.envs):
        raise ValueError(
            f"the saved environment state has {len(state['envs'])} environments, "
            f"this one {len(base.envs)}"
        )
    for obj, saved in zip(chain, state["vector"]):
        _restore_object(obj, saved)
    for sub, saved_chain in zip(base.envs, state["envs"]):
        for obj, saved in zip(_chain(sub), saved_chain):
            _restore_object(obj, saved)
