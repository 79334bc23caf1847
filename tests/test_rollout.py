"""Rollout bookkeeping: life loss, autoreset steps and counting, on a scripted env."""

import json

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdqn import Rollout
from fdqn import rollout as rollout_module


class ScriptedEnv(gym.vector.VectorEnv):
    """Two envs; env 0 loses a life at step 2 and its game ends at step 4 (next-step autoreset)."""

    def __init__(self):
        self.num_envs = 2
        self.single_action_space = gym.spaces.Discrete(3)
        self.single_observation_space = gym.spaces.Box(-1e9, 1e9, (2,), np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return self._obs(), {"life_lost": np.zeros(2, bool)}

    def _obs(self):
        return np.array([[self.t, 0], [self.t, 1]], np.float32)

    def step(self, actions):
        self.t += 1
        terminated = np.array([self.t == 4, False])
        life_lost = np.array([self.t == 2, False])
        info = {"life_lost": life_lost}
        if self.t == 4:
            info |= {"episode": {"r": np.array([7.0, 0.0]), "l": np.array([4, 0])},
                     "_episode": np.array([True, False])}  # fmt: skip
        return self._obs(), np.ones(2, np.float32), terminated, np.zeros(2, bool), info


class RecordingMemory:
    def __init__(self):
        self.calls = []

    def start(self, obs):
        self.calls.append(("start", obs.copy()))

    def add(self, action, reward, next_obs, terminated, autoreset):
        self.calls.append(("add", terminated.copy(), autoreset.copy(), action.copy()))


def q_fn(params, obs):
    return jnp.stack([obs[:, 1], -obs[:, 1], jnp.zeros(obs.shape[0])], axis=1) * params


def test_life_loss_terminal_autoreset_and_counts():
    memory = RecordingMemory()
    rollout = Rollout(ScriptedEnv(), q_fn, memory, seed=0)
    results = [rollout.step(1.0, epsilon=0.0) for _ in range(5)]
    adds = [c for c in memory.calls if c[0] == "add"]
    assert memory.calls[0][0] == "start"
    terminal = np.array([a[1] for a in adds])
    autoreset = np.array([a[2] for a in adds])
    np.testing.assert_array_equal(terminal[:, 0], [False, True, False, True, False])
    np.testing.assert_array_equal(autoreset[:, 0], [False, False, False, False, True])
    assert not terminal[:, 1].any() and not autoreset[:, 1].any()
    # greedy actions: env 0 sees obs[:, 1] = 0 -> ties go to action 0; env 1 prefers action 0
    np.testing.assert_array_equal(adds[0][3], [0, 0])
    scores, lengths = results[3]
    np.testing.assert_array_equal(scores, [7.0])
    np.testing.assert_array_equal(lengths, [4])
    assert rollout.agent_steps == 10


def test_life_loss_not_terminal_when_disabled():
    memory = RecordingMemory()
    rollout = Rollout(ScriptedEnv(), q_fn, memory, seed=0, terminal_on_life_loss=False)
    for _ in range(3):
        rollout.step(1.0, epsilon=1.0)
    terminal = np.array([c[1] for c in memory.calls if c[0] == "add"])
    assert not terminal.any()


class SplitScriptedEnv(ScriptedEnv):
    """ScriptedEnv whose steps can be split into send and recv, logging the order of calls."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def send(self, actions):
        self.log.append("send")
        self._actions = actions

    def recv(self):
        self.log.append("recv")
        return self.step(self._actions)


class LoggingMemory(RecordingMemory):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def add(self, *args):
        self.log.append("add")
        super().add(*args)


def test_work_during_a_step_runs_between_send_and_the_replay_write():
    log = []
    rollout = Rollout(SplitScriptedEnv(log), q_fn, LoggingMemory(log), seed=0)
    plain = Rollout(ScriptedEnv(), q_fn, RecordingMemory(), seed=0)
    for _ in range(5):
        rollout.step(1.0, epsilon=0.0, during=lambda: log.append("during"))
        plain.step(1.0, epsilon=0.0)
    assert log == ["send", "during", "recv", "add"] * 5
    for ours, reference in zip(rollout.memory.calls, plain.memory.calls):  # same transitions
        assert all(np.array_equal(a, b) for a, b in zip(ours[1:], reference[1:]))
    assert rollout.agent_steps == plain.agent_steps == 10


def test_a_failing_during_still_finishes_and_records_the_step():
    log = []
    rollout = Rollout(SplitScriptedEnv(log), q_fn, LoggingMemory(log), seed=0)

    def fail():
        raise RuntimeError("update failed")

    try:
        rollout.step(1.0, epsilon=0.0, during=fail)
    except RuntimeError as e:
        assert str(e) == "update failed"
    else:
        raise AssertionError("the exception of during() was swallowed")
    assert log == ["send", "recv", "add"] and rollout.agent_steps == 2


def test_during_runs_after_the_step_for_envs_that_cannot_split_it():
    memory = RecordingMemory()
    rollout = Rollout(ScriptedEnv(), q_fn, memory, seed=0)
    seen = []
    rollout.step(1.0, epsilon=0.0, during=lambda: seen.append(len(memory.calls)))
    assert seen == [1] and len(memory.calls) == 2  # start only, then the step's add


def test_epsilon_outside_zero_one_is_refused_before_the_envs_step():
    memory = RecordingMemory()
    rollout = Rollout(ScriptedEnv(), q_fn, memory, seed=0)
    for epsilon in (-0.5, 1.01):
        with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\]"):
            rollout.step(1.0, epsilon=epsilon)
    assert rollout.agent_steps == 0 and len(memory.calls) == 1  # start only


def _actions(rollout, steps, epsilon=0.5):
    """The actions of the next ``steps`` steps, as the memory recorded them."""
    actions = []
    for _ in range(steps):
        rollout.step(1.0, epsilon=epsilon)
        actions.append(rollout.memory.calls[-1][3])
    return np.stack(actions)


def test_exploration_uses_an_rbg_key_and_repeats_for_a_seed():
    first = Rollout(ScriptedEnv(), q_fn, RecordingMemory(), seed=5)
    again = Rollout(ScriptedEnv(), q_fn, RecordingMemory(), seed=5)
    other = Rollout(ScriptedEnv(), q_fn, RecordingMemory(), seed=6)
    assert str(jax.random.key_impl(first.key)) == rollout_module.KEY_IMPL == "rbg"
    a, b, c = (_actions(r, 40) for r in (first, again, other))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # q_fn above makes action 0 greedy in both envs; at epsilon 0.5 with 3 actions a third
    # of the random half is greedy too: 2/3 of 80 actions, binomial sd 0.05
    assert 0.5 < np.mean(a == 0) < 0.83 and set(np.unique(a)) == {0, 1, 2}


def test_state_dict_round_trip_continues_the_same_exploration():
    straight = Rollout(ScriptedEnv(), q_fn, RecordingMemory(), seed=1)
    _actions(straight, 3)
    arrays, data = straight.state_dict()
    assert data["key_impl"] == "rbg" and arrays["rollout/key"].shape == (4,)
    expected = _actions(straight, 20)
    restored = Rollout(ScriptedEnv(), q_fn, RecordingMemory(), seed=99)
    restored.env.t = 3  # the scripted env's own state, which the rollout does not hold
    restored.load_state_dict(arrays, json.loads(json.dumps(data)))  # as meta.json keeps it
    assert np.array_equal(_actions(restored, 20), expected)


def test_checkpoints_from_before_rbg_keys_load_as_threefry():
    rollout = Rollout(ScriptedEnv(), q_fn, RecordingMemory(), seed=1)
    arrays, data = rollout.state_dict()
    del data["key_impl"]  # what checkpoints written before it hold
    arrays["rollout/key"] = np.asarray(jax.random.key_data(jax.random.key(7)))  # threefry, (2,)
    rollout.load_state_dict(arrays, data)
    assert str(jax.random.key_impl(rollout.key)) == "threefry2x32"
    _actions(rollout, 3)  # and it acts
    arrays["rollout/key"] = np.zeros(3, np.uint32)
    with pytest.raises(ValueError, match=r"^saved exploration key of shape \(3,\) is not a valid "
                                          r"'threefry2x32' PRNG key$"):  # fmt: skip
        rollout.load_state_dict(arrays, data)
    data["key_impl"] = "no-such-prng"
    arrays["rollout/key"] = np.zeros(4, np.uint32)
    with pytest.raises(ValueError, match=r"not a valid 'no-such-prng' PRNG key$"):
        rollout.load_state_dict(arrays, data)
