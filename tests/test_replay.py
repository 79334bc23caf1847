"""Replay memory against a naive reference that stores whole transitions."""

import collections
import mmap
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdqn import ReplayMemory, replay

FRAME = 3  # elements per frame: small, unique per (env, step)


class FakeVectorEnv:
    """A next-step-autoreset vector env whose frames are all distinct and non-zero.

    Episodes of env ``e`` have lengths ``lengths[e][i % len(lengths[e])]`` and end by
    termination or truncation at random; lives are lost at random in between.
    """

    def __init__(self, num_envs, lengths, stack, seed):
        self.n, self.lengths, self.stack = num_envs, lengths, stack
        self.rng = np.random.default_rng(seed)
        self.counter = 0
        self.episode = [0] * num_envs
        self.t = [0] * num_envs
        self.stacks = [None] * num_envs
        self.done = np.zeros(num_envs, bool)

    def _frame(self, e):
        self.counter += 1
        c = self.counter
        if self.stack:
            return np.array([c % 250 + 1, c // 250 % 250 + 1, e + 1], np.uint8)
        return np.array([c, e, 1.5], np.float32)

    def _begin(self, e):
        f = self._frame(e)
        self.t[e] = 0
        if self.stack:
            self.stacks[e] = np.stack([np.zeros_like(f)] * (self.stack - 1) + [f])
        else:
            self.stacks[e] = f

    def reset(self):
        for e in range(self.n):
            self._begin(e)
        self.done[:] = False
        return np.stack(self.stacks)

    def step(self, actions):
        reward = np.zeros(self.n, np.float32)
        terminated = np.zeros(self.n, bool)
        truncated = np.zeros(self.n, bool)
        learn_terminal = np.zeros(self.n, bool)
        autoreset = self.done.copy()
        for e in range(self.n):
            if self.done[e]:
                self.episode[e] += 1
                self._begin(e)
                continue
            f = self._frame(e)
            self.stacks[e] = np.concatenate([self.stacks[e][1:], f[None]]) if self.stack else f
            self.t[e] += 1
            reward[e] = self.rng.integers(-2, 3)
            lengths = self.lengths[e]
            if self.t[e] >= lengths[self.episode[e] % len(lengths)]:
                if self.rng.random() < 0.5:
                    terminated[e] = True
                else:
                    truncated[e] = True
            learn_terminal[e] = terminated[e] or self.rng.random() < 0.1  # life loss
        self.done = terminated | truncated
        return np.stack(self.stacks), reward, terminated, truncated, learn_terminal, autoreset


def key(obs, action, reward, next_obs, terminated):
    return (np.asarray(obs).tobytes(), int(action), float(reward), np.asarray(next_obs).tobytes(),
            bool(terminated))  # fmt: skip


def run(num_envs, capacity, lengths, stack, steps, seed=0, prefault=True):
    """Feeds the same stream to the memory and to the naive reference."""
    env = FakeVectorEnv(num_envs, lengths, stack, seed)
    obs_shape = (stack, FRAME) if stack else (FRAME,)
    dtype = np.uint8 if stack else np.float32
    memory = ReplayMemory(capacity, num_envs, obs_shape, dtype, stack or None, seed, prefault)
    per_env = capacity // num_envs
    # naive reference: per env, the last per_env steps, each a whole transition or None
    reference = [collections.deque(maxlen=per_env) for _ in range(num_envs)]
    rng = np.random.default_rng(seed + 1)
    obs = env.reset()
    memory.start(obs)
    for _ in range(steps):
        actions = rng.integers(0, 4, num_envs)
        next_obs, reward, _, _, learn_terminal, autoreset = env.step(actions)
        memory.add(actions, reward, next_obs, learn_terminal, autoreset)
        for e in range(num_envs):
            entry = None
            if not autoreset[e]:
                entry = key(obs[e], actions[e], reward[e], next_obs[e], learn_terminal[e])
            reference[e].append(entry)
        obs = next_obs
    held = collections.Counter(k for ring in reference for k in ring if k is not None)
    return memory, held


@settings(max_examples=60, deadline=None)
@given(
    num_envs=st.integers(1, 4),
    extra_capacity=st.integers(0, 40),
    lengths=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=4, max_size=4),
    stack=st.sampled_from([0, 2, 4]),
    steps=st.integers(1, 90),
    seed=st.integers(0, 1000),
)
def test_samples_are_transitions_the_reference_holds(
    num_envs, extra_capacity, lengths, stack, steps, seed
):
    capacity = num_envs + extra_capacity
    memory, held = run(num_envs, capacity, lengths, stack, steps, seed)
    assert len(memory) == sum(held.values())
    if len(memory) == 0:
        with pytest.raises(ValueError, match="holds 0 transitions"):
            memory.sample(1)
        return
    # with at most 8 transitions held all must be drawn: 64 draws a transition miss one with
    # probability < 1e-28; beyond that the draws only have to be transitions held
    rounds = 64 if len(held) <= 8 else 4
    batches = [memory.sample(len(memory)) for _ in range(rounds)]
    batch = type(batches[0])(*(np.concatenate(column) for column in zip(*batches)))
    seen = set()
    for i in range(len(batch.action)):
        k = key(batch.obs[i], batch.action[i], batch.reward[i], batch.next_obs[i],
                batch.terminated[i])  # fmt: skip
        assert k in held, f"sampled transition {i} is not one the reference holds"
        seen.add(k)
    if len(held) <= 8:
        assert seen == set(held)


def test_stacks_are_zero_padded_at_episode_start():
    # one env, episodes of length 2: stacks never hold frames of the previous episode
    memory, held = run(1, 50, [[2]], 4, 30)
    batch = memory.sample(len(memory))
    for obs, next_obs in zip(batch.obs, batch.next_obs):
        ids = {tuple(f) for f in np.concatenate([obs, next_obs]) if f.any()}
        # frames of one episode are consecutive counters; at most 3 distinct here
        assert len(ids) <= 3
        assert obs[0].sum() == 0 and obs[1].sum() == 0  # at most 2 real frames before the end


def test_wraparound_keeps_only_the_newest():
    memory, held = run(2, 10, [[100], [100]], 4, 57)
    assert len(memory) == 10 == sum(held.values())
    batch = memory.sample(10)
    # counters of the sampled obs' newest frames all belong to the last 5 steps per env
    newest = batch.obs[:, -1, 0].astype(int) - 1 + 250 * (batch.obs[:, -1, 1].astype(int) - 1)
    assert newest.min() >= 2 * (57 - 5)


def test_capacity_one():
    memory, held = run(1, 1, [[3]], 4, 7)
    assert len(memory) == sum(held.values()) <= 1
    memory, held = run(1, 1, [[100]], 0, 7)
    assert len(memory) == 1
    b = memory.sample(1)
    assert key(b.obs[0], b.action[0], b.reward[0], b.next_obs[0], b.terminated[0]) in held


def test_batch_larger_than_size_is_an_error():
    memory, _ = run(2, 100, [[50], [50]], 4, 3)
    assert len(memory) == 6
    with pytest.raises(ValueError, match="cannot sample a batch of 7: the replay memory holds 6"):
        memory.sample(7)


def test_seeded_sampling_is_reproducible():
    a, _ = run(3, 60, [[5], [7], [2]], 4, 40, seed=3)
    b, _ = run(3, 60, [[5], [7], [2]], 4, 40, seed=3)
    for x, y in zip(a.sample(32), b.sample(32)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("stack", [0, 4])
def test_sampled_observations_are_separate_aligned_arrays(stack):
    # contiguous and on a 64-byte boundary, so JAX on the CPU uses them without a copy
    memory, _ = run(2, 40, [[5], [7]], stack, 30)
    batch = memory.sample(16)
    for array in (batch.obs, batch.next_obs):
        assert array.flags.c_contiguous and array.flags.writeable
        assert array.ctypes.data % 64 == 0
    # obs and next_obs share an allocation, never elements: writing one leaves the other
    assert not np.shares_memory(batch.obs, batch.next_obs)
    before = batch.next_obs.copy()
    batch.obs[...] = 255
    np.testing.assert_array_equal(batch.next_obs, before)


def test_bytes_per_atari_transition_under_target():
    capacity = 100_000
    memory = ReplayMemory(capacity, 8, (4, 84, 84), np.uint8, frame_stack=4)
    per_transition = memory.nbytes() / capacity
    assert per_transition <= 7300, per_transition  # a whole (obs, next_obs) pair is 56,448 bytes


@pytest.mark.parametrize("stack", [0, 4])
def test_prefault_changes_no_contents(stack):
    a, _ = run(3, 60, [[5], [7], [2]], stack, 90, seed=4, prefault=True)
    b, _ = run(3, 60, [[5], [7], [2]], stack, 90, seed=4, prefault=False)
    assert len(a) == len(b) > 30
    for x, y in zip(a.sample(30), b.sample(30)):
        np.testing.assert_array_equal(x, y)


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(
    not hasattr(mmap, "MAP_POPULATE") or not os.path.exists("/proc/self/statm"),
    reason="prefaulting needs Linux (MAP_POPULATE, /proc)",
)
def test_prefault_maps_the_observation_store_up_front():
    size = 64 * 2**20
    before = _resident_bytes()
    eager = ReplayMemory(8 * 1024, 8, (4, 64, 128), np.uint8, frame_stack=4)
    grown = _resident_bytes() - before
    assert eager._frames.nbytes >= size
    assert grown >= 0.9 * eager._frames.nbytes, (grown, eager._frames.nbytes)
    assert not eager._frames.any() and eager._frames.flags.writeable
    before = _resident_bytes()
    lazy = ReplayMemory(8 * 1024, 8, (4, 64, 128), np.uint8, frame_stack=4, prefault=False)
    assert _resident_bytes() - before < 0.1 * lazy._frames.nbytes


@pytest.mark.skipif(
    not hasattr(mmap, "MAP_ANONYMOUS") or not os.path.exists("/proc/self/statm"),
    reason="needs anonymous mmap and /proc",
)
def test_lazy_store_stays_unmapped_where_the_heap_has_a_free_hole():
    # with fdqn's malloc settings (no mmap for large blocks) a large np.zeros could be carved
    # out of this freed, never-written block; calloc would then zero it and map every page
    hole = np.empty(96 * 2**20, np.uint8)
    after = np.empty(8 * 2**20, np.uint8)  # keeps the hole off the top of the heap
    del hole
    before = _resident_bytes()
    lazy = ReplayMemory(8 * 1024, 8, (4, 64, 128), np.uint8, frame_stack=4, prefault=False)
    assert _resident_bytes() - before < 0.1 * lazy._frames.nbytes
    assert not lazy._frames.any() and lazy._frames.flags.writeable
    del after


def test_memory_larger_than_available_ram_is_refused(monkeypatch):
    monkeypatch.setattr(replay, "available_memory", lambda: 2**30)
    with pytest.raises(ValueError, match=r"capacity 1,000,000 needs 6.\d\d GiB .* only 1.00 GiB"):
        ReplayMemory(1_000_000, 8, (4, 84, 84), np.uint8, frame_stack=4)
    ReplayMemory(1_000_000, 8, (4, 84, 84), np.uint8, frame_stack=4, prefault=False)  # lazy


def test_save_and_load_round_trip(tmp_path):
    memory, _ = run(2, 40, [[3], [8]], 4, 50, seed=5)
    path = tmp_path / "replay.npz"
    memory.save(path)
    restored = ReplayMemory.load(path)
    assert len(restored) == len(memory)
    for x, y in zip(memory.sample(32), restored.sample(32)):
        np.testing.assert_array_equal(x, y)  # same contents and same generator state


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "replay.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable fdqn replay file"):
        ReplayMemory.load(path)


def test_failed_save_leaves_existing_file(tmp_path, monkeypatch):
    memory, _ = run(1, 10, [[3]], 4, 5)
    path = tmp_path / "replay.npz"
    memory.save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        memory.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["replay.npz"]


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: m.add(
                np.zeros(2, int), np.zeros(2), np.zeros((2, 4, 3), np.uint8), np.zeros(2, bool)
            ),
            "call start",
        ),  # fmt: skip
        (lambda m: m.start(np.zeros((2, 4, 5), np.uint8)), r"obs must have shape \(2, 4, 3\)"),
        (lambda m: m.start(np.zeros((2, 4, 3), np.float32)), "obs must have dtype uint8"),
    ],
)
def test_bad_writes(call, message):
    memory = ReplayMemory(10, 2, (4, 3), np.uint8, frame_stack=4)
    with pytest.raises((ValueError, RuntimeError), match=message):
        call(memory)


def test_bad_add_columns():
    memory = ReplayMemory(10, 2, (4, 3), np.uint8, frame_stack=4)
    memory.start(np.zeros((2, 4, 3), np.uint8))
    obs = np.zeros((2, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="action must have an integer dtype"):
        memory.add(np.zeros(2), np.zeros(2), obs, np.zeros(2, bool))
    with pytest.raises(ValueError, match="reward must have a real number dtype, got complex"):
        memory.add(np.zeros(2, int), np.zeros(2, complex), obs, np.zeros(2, bool))
    with pytest.raises(ValueError, match="terminated must have a bool dtype, got float"):
        memory.add(np.zeros(2, int), np.zeros(2), obs, np.zeros(2))
    with pytest.raises(ValueError, match=r"reward must have shape \(2,\)"):
        memory.add(np.zeros(2, int), np.zeros(3), obs, np.zeros(2, bool))
    assert len(memory) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        ((1, 2, (4,)), "capacity must be an integer of at least num_envs"),
        ((10, 0, (4,)), "num_envs must be a positive integer"),
        ((10, 1, (3, 84, 84), np.uint8, 4), "frame_stack=4 needs observations of shape"),
        (
            (10, 1, (4, -84)),
            r"obs_shape must be one or more positive integers, e.g. \(4,\), got \(4, -84\)",
        ),
        (
            (10, 1, (4, 8.5)),
            r"obs_shape must be one or more positive integers, e.g. \(4,\), got \(4, 8.5\)",
        ),
    ],
)
def test_bad_construction(args, message):
    with pytest.raises(ValueError, match=message):
        ReplayMemory(*args)


# -- the same stream into the on-device frame ring of compiled runs ----------------------


@settings(max_examples=10, deadline=None)
@given(
    num_envs=st.integers(1, 4),
    extra_capacity=st.integers(0, 40),
    lengths=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=4, max_size=4),
    stack=st.sampled_from([2, 4]),
    steps=st.integers(1, 90),
    seed=st.integers(0, 1000),
)
def test_device_frame_ring_samples_are_transitions_the_reference_holds(
    num_envs, extra_capacity, lengths, stack, steps, seed
):
    import jax

    from fdqn import device_replay as dr

    capacity = num_envs + extra_capacity
    env = FakeVectorEnv(num_envs, lengths, stack, seed)
    reference = [collections.deque(maxlen=capacity // num_envs) for _ in range(num_envs)]
    rng = np.random.default_rng(seed + 1)
    add = jax.jit(dr.frame_ring_add)
    obs = env.reset()
    ring = dr.frame_ring_init(capacity, num_envs, (stack, FRAME))
    zeros = np.zeros(num_envs, np.int32)
    ring = add(ring, obs, zeros, zeros, zeros.astype(bool), ~zeros.astype(bool))
    for _ in range(steps):
        actions = rng.integers(0, 4, num_envs)
        next_obs, reward, _, _, learn_terminal, autoreset = env.step(actions)
        ring = add(ring, next_obs, actions, reward, learn_terminal, autoreset)
        for e in range(num_envs):
            entry = None
            if not autoreset[e]:
                entry = key(obs[e], actions[e], reward[e], next_obs[e], learn_terminal[e])
            reference[e].append(entry)
        obs = next_obs
    held = collections.Counter(k for ring_ in reference for k in ring_ if k is not None)
    # the ring's size counts the steps it holds, resets included, as the reference's rings
    assert int(dr.frame_ring_size(ring, stack)) == sum(len(r) for r in reference)
    if not held:  # every step held is a reset: nothing to sample
        return
    # every frame differs, so each transition held is one key; with at most 8 of them
    # all must be drawn, and 64 draws a transition miss one with probability < 1e-30
    total = sum(held.values())
    draws = 64 * (total + 1) if len(held) <= 8 else 4 * total + 16
    batch = jax.jit(dr.frame_ring_sample, static_argnums=(2, 3))(
        ring, jax.random.key(seed), draws, stack
    )
    seen = set()
    for i in range(len(batch.action)):
        k = key(batch.obs[i], batch.action[i], batch.reward[i], batch.next_obs[i],
                batch.terminated[i])  # fmt: skip
        assert k in held, f"sampled transition {i} is not one the reference holds"
        seen.add(k)
    if len(held) <= 8:
        assert seen == set(held)


def test_device_frame_ring_draws_transitions_uniformly():
    import jax

    from fdqn import device_replay as dr

    # one env, episodes of 3 steps: every 4th step is a reset and holds nothing
    env = FakeVectorEnv(1, [[3]], 2, 0)
    ring = dr.frame_ring_init(12, 1, (2, FRAME))
    ring = dr.frame_ring_add(ring, env.reset(), [0], [0], [False], [True])
    for t in range(12):
        next_obs, reward, _, _, terminal, autoreset = env.step(np.array([t % 4]))
        ring = dr.frame_ring_add(ring, next_obs, [t % 4], reward, terminal, autoreset)
    batch = dr.frame_ring_sample(ring, jax.random.key(0), 9_000, 2)
    # 12 steps held, 9 of them transitions: each drawn 1/9 of the time (1,000 +- 3 sigma)
    frames = np.asarray(batch.next_obs[:, -1, 0])
    counts = collections.Counter(frames.tolist())
    assert len(counts) == 9
    assert all(abs(c - 1000) < 3 * np.sqrt(9000 * (1 / 9) * (8 / 9)) for c in counts.values())
