"""Learning smoke tests on probe environments whose Q-values are known in closed form.

Each probe has one-dimensional observations and two actions; fdqn.train's loop
(rollout, replay, updates, target copies) runs on it and the learned Q-values
are compared with the exact ones. A wrong discount, a bootstrap through a
terminal state, a truncation treated as termination, or a misplaced action
index each moves them far outside the tolerance.
"""

import os

import gymnasium as gym
import numpy as np
import pytest

from fdqn import train
from fdqn.config import Config

GAMMA = 0.5


class Probe(gym.Env):
    """``kind`` picks the dynamics; observations are the step within the episode."""

    def __init__(self, kind: str):
        self.kind = kind
        self.observation_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.full(1, min(self.t, 1), np.float32)
        if self.kind == "bandit":  # one step: action 1 pays 1, action 0 nothing
            return obs, float(action), True, False, {}
        if self.kind == "chain":  # s0 -> s1 -> end, reward 1 on the last step, any action
            return obs, float(self.t == 2), self.t == 2, False, {}
        # "constant": reward 1 forever, cut by a time limit (truncated, never terminal)
        return np.zeros(1, np.float32), 1.0, False, self.t == 10, {}


for _kind in ("bandit", "chain", "constant"):
    gym.register(f"fdqn-probe/{_kind}-v0", entry_point=lambda kind=_kind: Probe(kind))


# state -> exact Q-values of its two actions
EXPECTED = {
    "bandit": {0.0: (0.0, 1.0)},
    "chain": {0.0: (GAMMA, GAMMA), 1.0: (1.0, 1.0)},
    "constant": {0.0: (1 / (1 - GAMMA),) * 2},  # 1 + g + g^2 + ... = 2
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_learned_q_values_match_the_closed_form(kind, tmp_path):
    config = Config(
        env=f"fdqn-probe/{kind}-v0",
        network="mlp",
        hidden=(32,),
        total_steps=2_000,
        num_envs=1,
        lr=3e-3,
        batch_size=32,
        buffer_size=2_000,
        learning_starts=200,
        train_every=1,
        target_update=50,
        gamma=GAMMA,
        clip="none",
        epsilon_end=1.0,  # uniform actions: every state-action pair is visited
        eval_every=0,
        checkpoint_every=0,
        terminal_on_life_loss=False,
        seed=0,
    ).validate()
    os.makedirs(tmp_path / "run")
    summary = train.train(config, str(tmp_path / "run"), stream=open(os.devnull, "w"))
    state = summary["state"]
    for obs, want in EXPECTED[kind].items():
        got = np.asarray(state.q_fn(state.params, np.array([[obs]], np.float32)))[0]
        np.testing.assert_allclose(got, want, atol=0.1, err_msg=f"{kind}, state {obs}")
