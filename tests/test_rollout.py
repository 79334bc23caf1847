"""Rollout bookkeeping: life loss, autoreset steps and counting, on a scripted env."""

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest

from fdqn import Rollout


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
