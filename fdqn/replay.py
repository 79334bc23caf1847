"""A replay memory for N parallel environments that stores each frame once.

Frame-stacked Atari observations share all but one frame with the
observation before them, and ``next_obs`` shares all but one with ``obs``.
Storing whole transitions keeps every frame 8 times over; this memory keeps,
per environment and per step, only the newest frame, the action, the reward
and two flags, and rebuilds both stacks when it samples. A stack never
reaches back past the start of its episode: older frames come out as zeros,
exactly as the environment gives them after a reset.

Layout: one ring of ``capacity // num_envs`` transitions per environment,
all written in step, so that a stream position ``t`` is the same step for
every environment. Position ``t`` holds the newest frame of the observation
seen at step ``t`` and the action, reward and ``terminated`` flag of the
transition from it; that transition is *valid* once the frame of step
``t + 1`` is written, unless step ``t + 1`` was an autoreset (the env's
episode ended at ``t`` and its output starts a new one). Each ring keeps
``frame_stack`` extra slots so the oldest transition still has its history.

Usage with a next-step-autoreset vector env::

    obs, _ = env.reset(seed=0)
    memory.start(obs)
    prev_done = np.zeros(num_envs, bool)
    while ...:
        next_obs, reward, terminated, truncated, info = env.step(actions)
        memory.add(actions, reward, next_obs, terminated, autoreset=prev_done)
        prev_done = terminated | truncated
"""

import json
import mmap
import os
from collections.abc import Sequence

import numpy as np

from fdqn.learner import Batch
from fdqn.rundir import atomic_write

_FORMAT = "fdqn.replay/1"
# JAX on the CPU uses a host array passed to it in place, without a copy, when
# its data starts on a 64-byte boundary (0.02 against 0.3-0.9 ms to pass
# obs and next_obs of 64 Atari windows to a jitted function here)
_ALIGN = 64


def _aligned_takes(source: np.ndarray, indices: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``source[index]`` (along the first axis) for each index, in fresh aligned arrays.

    The arrays share one allocation and each starts on an :data:`_ALIGN`-byte
    boundary. One allocation per batch, not one per array: with two arrays
    of a few MB alive at once, the allocator returned their pages to the
    system on every batch and took page faults to get them back (~3 ms per
    batch of 64 Atari windows here).
    """
    shapes = [index.shape + source.shape[1:] for index in indices]
    sizes = [int(np.prod(shape)) * source.dtype.itemsize for shape in shapes]
    strides = [-(-size // _ALIGN) * _ALIGN for size in sizes]
    raw = np.empty(sum(strides) + _ALIGN, np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    out = []
    for index, shape, size, stride in zip(indices, shapes, sizes, strides):
        array = raw[offset : offset + size].view(source.dtype).reshape(shape)
        # mode="clip" (the indices are in range) lets numpy write into the array directly
        out.append(np.take(source, index, axis=0, out=array, mode="clip"))
        offset += stride
    return out


_MAX_ACTION = np.iinfo(np.int32).max  # actions are stored as int32


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


_ARRAYS = ("frames", "action", "reward", "terminated", "valid", "first")


def available_memory() -> int | None:
    """Bytes of RAM the kernel says new allocations can get (``MemAvailable``); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _zeros(shape: tuple[int, ...], dtype: np.dtype, prefault: bool) -> np.ndarray:
    """A zeroed array in its own anonymous mapping; with ``prefault`` its pages are mapped now.

    Without ``prefault`` the kernel maps each page at its first write, which
    for a replay memory means every write of its first pass. One ``mmap``
    with ``MAP_POPULATE`` maps them all up front instead, several times
    faster than faulting them in one by one. The mapping is the array's own
    either way, not malloc's: with the malloc settings of
    :func:`fdqn.cpu.tune` a large ``np.zeros`` can reuse freed
    heap memory, which calloc zeroes, mapping every page at once.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
    populate = getattr(mmap, "MAP_POPULATE", None) if prefault else 0
    if anonymous is None or populate is None or nbytes == 0:
        return np.zeros(shape, dtype)
    flags = mmap.MAP_PRIVATE | anonymous | populate
    try:
        buffer = mmap.mmap(-1, nbytes, flags=flags)  # anonymous pages are zero-filled
    except OSError as e:  # ENOMEM: more than the kernel will commit
        raise MemoryError(f"cannot map {nbytes / 2**30:.2f} GiB: {e.strerror}") from None
    return np.frombuffer(buffer, dtype).reshape(shape)  # the array keeps the mapping alive


class ReplayMemory:
    """Fixed-capacity uniform replay for ``num_envs`` environments stepped together.

    Args:
      capacity: maximum number of transitions held, over all environments; at
        least ``num_envs``. Each environment gets ``capacity // num_envs``.
      num_envs: number of environments writing each step.
      obs_shape: shape of one observation, e.g. ``(4, 84, 84)`` or ``(4,)``.
      obs_dtype: dtype observations are stored and returned in (uint8 for
        Atari, float32 for vectors).
      frame_stack: if set, observations are stacks of this many frames along
        their first axis, and only the newest frame of each is stored.
      seed: seed of the generator used by :meth:`sample`.
      prefault: map the observation store's memory now (on Linux), so that
        no write during the run waits for the kernel to map a page: on this
        project's benchmark machine the first pass through a lazily mapped
        store slowed the rollout by up to 15%. Costs 1-4 s per GiB there
        (8-25 s for the 6.6 GiB of a 1M-transition Atari memory), and holds
        the memory from the start; a store larger than the RAM available is
        then refused with a ValueError.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_shape: Sequence[int],
        obs_dtype: np.dtype | type = np.float32,
        frame_stack: int | None = None,
        seed: int = 0,
        prefault: bool = True,
    ):
        if not _is_int(num_envs) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if not _is_int(capacity) or capacity < num_envs:
            raise ValueError(
                f"capacity must be an integer of at least num_envs ({num_envs}), got {capacity!r}"
            )
        obs_shape = tuple(obs_shape)
        if not obs_shape or not all(_is_int(d) and d >= 1 for d in obs_shape):
            raise ValueError(
                f"obs_shape must be one or more positive integers, e.g. (4,), got {obs_shape}"
            )
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        if frame_stack is not None:
            if frame_stack < 1 or len(self.obs_shape) < 2 or self.obs_shape[0] != frame_stack:
                raise ValueError(
                    f"frame_stack={frame_stack} needs observations of shape "
                    f"({frame_stack}, ...), got {self.obs_shape}"
                )
        self.frame_stack = frame_stack
        self.num_envs = int(num_envs)
        self.per_env = int(capacity) // self.num_envs
        self.capacity = self.per_env * self.num_envs
        history = frame_stack or 1
        self.slots = self.per_env + history  # history - 1 older frames, plus the next frame
        frame_shape = self.obs_shape[1:] if frame_stack else self.obs_shape
        n, s = self.num_envs, self.slots
        frames_shape = (n, s, *frame_shape)
        if prefault:
            need = int(np.prod(frames_shape, dtype=np.int64)) * self.obs_dtype.itemsize
            have = available_memory()
            if have is not None and need > have:
                raise ValueError(
                    f"a replay memory of capacity {self.capacity:,} needs {need / 2**30:.2f} GiB "
                    f"for observations, only {have / 2**30:.2f} GiB of RAM is available: "
                    f"lower the capacity (buffer_size) or free memory"
                )
        try:
            self._frames = _zeros(frames_shape, self.obs_dtype, prefault)
            self._action = np.zeros((n, s), np.int32)
            self._reward = np.zeros((n, s), np.float32)
            self._terminated = np.zeros((n, s), bool)
            self._valid = np.zeros((n, s), bool)
            self._first = np.zeros((n, s), bool)
        except MemoryError as e:
            raise ValueError(
                f"a replay memory of capacity {self.capacity:,} does not fit in memory ({e}): "
                f"lower the capacity (buffer_size)"
            ) from None
        self._writes = 0  # stream positions written, per environment
        self._size = 0  # valid transitions held, over all environments
        self._rng = np.random.default_rng(seed)

    # -- writing ---------------------------------------------------------------

    def _frame_of(self, obs: np.ndarray, name: str) -> np.ndarray:
        obs = np.asarray(obs)
        if obs.shape != (self.num_envs, *self.obs_shape):
            raise ValueError(
                f"{name} must have shape {(self.num_envs, *self.obs_shape)}, got {obs.shape}"
            )
        if not np.can_cast(obs.dtype, self.obs_dtype, "same_kind"):
            raise ValueError(f"{name} must have dtype {self.obs_dtype}, got {obs.dtype}")
        frame = obs[:, -1] if self.frame_stack else obs
        if frame.dtype.kind == "f" and not np.isfinite(frame).all():
            raise ValueError(f"{name} holds NaN or infinite values: observations must be finite")
        return frame

    def _write(self, frame: np.ndarray, first: np.ndarray) -> None:
        # The position leaving the sampling window keeps its frame as history
        # for newer stacks but stops being a transition. Clear it before the
        # write: with one-frame observations it is the slot overwritten below.
        leaving = self._writes + 1 - self.per_env - 2
        if leaving >= 0:
            leaving_slot = leaving % self.slots
            self._size -= int(np.count_nonzero(self._valid[:, leaving_slot]))
            self._valid[:, leaving_slot] = False
        slot = self._writes % self.slots
        self._frames[:, slot] = frame
        self._first[:, slot] = first
        self._valid[:, slot] = False
        self._action[:, slot] = 0
        self._reward[:, slot] = 0.0
        self._terminated[:, slot] = False
        self._writes += 1

    def start(self, obs: np.ndarray) -> None:
        """Begins new episodes in all environments with their first observations.

        Call after ``env.reset()``. Frames before these are treated as zeros.
        """
        self._write(self._frame_of(obs, "obs"), np.ones(self.num_envs, bool))

    def add(
        self,
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        autoreset: np.ndarray | None = None,
    ) -> None:
        """Records one step of all environments.

        Args:
          action: ``(num_envs,)`` actions taken at the previous observations.
          reward: ``(num_envs,)`` rewards received.
          next_obs: ``(num_envs, *obs_shape)`` observations returned by the step.
          terminated: ``(num_envs,)`` whether ``next_obs`` is terminal for
            learning (game over or, on Atari, a lost life); not truncation.
          autoreset: ``(num_envs,)`` whether this step only reset the env
            (its previous step ended the episode): no transition is stored,
            and ``next_obs`` begins a new episode. None means all False.
        """
        if self._writes == 0:
            raise RuntimeError("call start(obs) with the first observations before add()")
        frame = self._frame_of(next_obs, "next_obs")
        autoreset = np.zeros(self.num_envs, bool) if autoreset is None else autoreset
        action = self._column("action", action, "iu", "an integer")
        if np.count_nonzero((action < 0) | (action > _MAX_ACTION)):
            bad = action[(action < 0) | (action > _MAX_ACTION)][0]
            raise ValueError(f"action {bad} is out of range: actions are in [0, 2**31)")
        reward = self._column("reward", reward, "iuf", "a real number")
        if reward.dtype.kind == "f" and not np.isfinite(reward).all():
            raise ValueError("reward holds NaN or infinite values: rewards must be finite")
        terminated = self._column("terminated", terminated, "b", "a bool")
        autoreset = self._column("autoreset", autoreset, "b", "a bool")
        slot = (self._writes - 1) % self.slots
        if np.count_nonzero(autoreset):
            keep = ~autoreset
            self._action[keep, slot] = action[keep]
            self._reward[keep, slot] = reward[keep]
            self._terminated[keep, slot] = terminated[keep]
            self._valid[keep, slot] = True
            self._size += int(np.count_nonzero(keep))
        else:  # the usual step: every environment stores a transition
            self._action[:, slot] = action
            self._reward[:, slot] = reward
            self._terminated[:, slot] = terminated
            self._valid[:, slot] = True
            self._size += self.num_envs
        self._write(frame, autoreset)

    def _column(self, name: str, value, kinds: str, kind_name: str) -> np.ndarray:
        value = np.asarray(value)
        if value.shape != (self.num_envs,):
            raise ValueError(f"{name} must have shape ({self.num_envs},), got {value.shape}")
        if value.dtype.kind not in kinds:
            raise ValueError(f"{name} must have {kind_name} dtype, got {value.dtype}")
        return value

    # -- reading ---------------------------------------------------------------

    def __len__(self) -> int:
        """Number of transitions that can be sampled."""
        return self._size

    def nbytes(self) -> int:
        """Bytes held by the memory's arrays."""
        return sum(getattr(self, f"_{name}").nbytes for name in _ARRAYS)

    def sample(self, batch_size: int) -> Batch:
        """Draws ``batch_size`` transitions uniformly, with replacement.

        Returns:
          A :class:`fdqn.Batch` of numpy arrays: ``obs`` and ``next_obs`` of
          shape ``(batch_size, *obs_shape)`` in ``obs_dtype``, int32 actions,
          float32 rewards and bool ``terminated``.
        """
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > self._size:
            raise ValueError(
                f"cannot sample a batch of {batch_size}: the replay memory holds "
                f"{self._size} transitions (capacity {self.capacity})"
            )
        env, pos = self._draw(batch_size)
        return self._gather(env, pos)

    def _draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Uniform (env, position) pairs among valid transitions, by rejection."""
        low = max(0, self._writes - self.per_env - 1)
        span = self._writes - 1 - low  # positions low .. writes - 2
        accept = self._size / (span * self.num_envs)
        envs, positions, have = [], [], 0
        while have < batch_size:
            n = int((batch_size - have) / accept * 1.1) + 8
            env = self._rng.integers(0, self.num_envs, n)
            pos = self._rng.integers(low, low + span, n)
            ok = self._valid[env, pos % self.slots]
            envs.append(env[ok])
            positions.append(pos[ok])
            have += int(np.count_nonzero(ok))
        return np.concatenate(envs)[:batch_size], np.concatenate(positions)[:batch_size]

    def _gather(self, env: np.ndarray, pos: np.ndarray) -> Batch:
        history = self.frame_stack or 1
        # window positions pos - history + 1 .. pos + 1: obs frames then the next frame
        window = pos[:, None] + np.arange(-history + 1, 2)
        slots = window % self.slots
        rows = env[:, None]
        index = rows * self.slots + slots  # into all rings' frames, laid end to end
        frames = self._frames.reshape(-1, *self._frames.shape[2:])
        if self.frame_stack:
            obs, next_obs = _aligned_takes(frames, (index[:, :-1], index[:, 1:]))
            # frame j is kept only if no episode starts after it, up to pos
            first = self._first[rows, slots]
            keep = np.ones(window.shape, bool)
            for j in range(history - 2, -1, -1):
                keep[:, j] = keep[:, j + 1] & ~first[:, j + 1]
            if not keep.all():
                # blank only the dropped frames, in place: np.where over the whole
                # batch took ~1.8 ms for 64 Atari windows, 20x the gather itself
                obs[~keep[:, :-1]] = 0
                next_obs[~keep[:, 1:]] = 0
        else:
            obs, next_obs = _aligned_takes(frames, (index[:, 0], index[:, 1]))
        here = pos % self.slots
        return Batch(
            obs=obs,
            action=self._action[env, here],
            reward=self._reward[env, here],
            next_obs=next_obs,
            terminated=self._terminated[env, here],
        )

    # -- saving ----------------------------------------------------------------

    def _meta(self) -> dict:
        return {
            "format": _FORMAT,
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "obs_shape": list(self.obs_shape),
            "obs_dtype": self.obs_dtype.str,
            "frame_stack": self.frame_stack,
            "writes": self._writes,
            "size": self._size,
            "rng": self._rng.bit_generator.state,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the contents to an ``.npz`` file, atomically (no pickle)."""
        arrays = {name: getattr(self, f"_{name}") for name in _ARRAYS}
        atomic_write(
            os.fspath(path),
            lambda f: np.savez(f, meta=np.array(json.dumps(self._meta())), **arrays),
            binary=True,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReplayMemory":
        """Reads a memory written by :meth:`save`; a damaged file raises ValueError."""
        try:
            with np.load(os.fspath(path), allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {name: data[name] for name in _ARRAYS}
        except FileNotFoundError:
            raise
        except Exception as e:  # zip, json and key errors all mean the same to the caller
            raise ValueError(f"{path} is not a readable fdqn replay file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise ValueError(f"{path} is not an fdqn replay file (format {found!r})")
        try:
            memory = cls(
                meta["capacity"],
                meta["num_envs"],
                meta["obs_shape"],
                np.dtype(meta["obs_dtype"]),
                meta["frame_stack"],
                prefault=False,
            )
            writes, size = meta["writes"], meta["size"]
            if not (_is_int(writes) and _is_int(size) and 0 <= size <= memory.capacity):
                raise ValueError(f"bad counters writes={writes!r}, size={size!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} has a damaged header ({e})") from None
        for name, value in arrays.items():
            mine = getattr(memory, f"_{name}")
            if value.shape != mine.shape or value.dtype != mine.dtype:
                raise ValueError(
                    f"{path}: array {name} has shape {value.shape} {value.dtype}, "
                    f"expected {mine.shape} {mine.dtype}"
                )
            mine[...] = value
        memory._writes = writes
        memory._size = size
        if memory._size != int(np.count_nonzero(memory._valid)):
            raise ValueError(f"{path}: stored size does not match its contents")
        try:
            memory._rng.bit_generator.state = meta["rng"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} has a damaged sampler state ({e})") from None
        return memory
