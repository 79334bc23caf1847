"""Atari and classic-control environments through fdqn.envs.make."""

import gymnasium as gym
import numpy as np
import pytest
from ale_py.vector_env import AtariVectorEnv

import fdqn
from fdqn import envs


@pytest.mark.parametrize(
    "env_id, game, sticky",
    [
        ("BreakoutNoFrameskip-v4", "breakout", 0.0),
        ("ALE/Breakout-v5", "breakout", 0.25),
        ("breakout", "breakout", 0.0),
        ("Breakout-v4", "breakout", 0.0),
        ("MsPacmanNoFrameskip-v4", "ms_pacman", 0.0),
        ("ALE/SpaceInvaders-v5", "space_invaders", 0.25),
        ("space_invaders", "space_invaders", 0.0),
    ],
)
def test_atari_ids(env_id, game, sticky):
    spec = envs.parse_atari_id(env_id)
    assert spec == envs.AtariSpec(game, sticky)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "NotAGameNoFrameskip-v4", "ALE/Nope-v5", ""])
def test_non_atari_ids(env_id):
    assert envs.parse_atari_id(env_id) is None


def test_unknown_env_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown env id 'Breakot-v4'.*list_env_ids") as e:
        envs.make("Breakot-v4", 2)
    assert "\n" not in str(e.value)
    assert "breakout" in envs.list_env_ids() and "CartPole-v1" in envs.list_env_ids()


def test_continuous_actions_rejected():
    with pytest.raises(ValueError, match="needs a Discrete one"):
        envs.make("MountainCarContinuous-v0", 1)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_envs(bad):
    with pytest.raises(ValueError, match="num_envs must be a positive integer"):
        envs.make("breakout", bad)


def test_atari_shapes_dtypes_and_zero_padded_reset():
    env = envs.make("BreakoutNoFrameskip-v4", 3)
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, 4, 84, 84) and obs.dtype == np.uint8
    assert env.single_action_space.n == 4
    assert not obs[:, :3].any() and obs[:, 3].any()  # zeros before the first frame
    next_obs, reward, terminated, truncated, info = env.step(np.ones(3, np.int32))
    assert reward.shape == (3,) and reward.dtype == np.float32
    assert terminated.dtype == bool and truncated.dtype == bool
    np.testing.assert_array_equal(next_obs[:, :3], obs[:, 1:])  # the stack shifts by one
    assert set(info) >= {"lives", "life_lost", "raw_reward"}
    env.close()


def test_seeding_gives_identical_first_observations():
    a = envs.make("breakout", 2)
    b = envs.make("breakout", 2)
    obs_a, _ = a.reset(seed=11)
    obs_b, _ = b.reset(seed=11)
    np.testing.assert_array_equal(obs_a, obs_b)
    actions = np.array([1, 3], np.int32)
    for _ in range(20):
        step_a, step_b = a.step(actions), b.step(actions)
    np.testing.assert_array_equal(step_a[0], step_b[0])


def play_until_game_over(env, max_steps=20_000, seed=0):
    """Random play of one env until its game ends; returns what was seen per step."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    log = {"reward": [], "raw": [], "terminated": [], "life_lost": [], "lives": []}
    for _ in range(max_steps):
        _, reward, terminated, truncated, info = env.step(rng.integers(0, 4, 1, dtype=np.int32))
        log["reward"].append(reward[0])
        log["raw"].append(info["raw_reward"][0])
        log["terminated"].append(terminated[0])
        log["life_lost"].append(info["life_lost"][0])
        log["lives"].append(info["lives"][0])
        if terminated[0] or truncated[0]:
            return log, envs.episode_stats(info)
    raise AssertionError("no game ended")


def test_life_loss_ends_training_episode_not_game():
    log, (scores, lengths) = play_until_game_over(envs.make("breakout", 1))
    lost = np.flatnonzero(log["life_lost"])
    assert len(lost) == 5  # Breakout has 5 lives; the game ends with the last
    assert not any(log["terminated"][i] for i in lost[:-1])  # the game went on
    assert log["terminated"][lost[-1]]
    lives = np.array(log["lives"])
    assert lives[lost[0]] == 4 and lives[lost[0] + 1] == 4  # no reset after a lost life
    assert lengths[0] == len(log["reward"])
    np.testing.assert_allclose(scores[0], np.sum(log["raw"]))


def test_true_scores_are_unclipped_and_learning_rewards_clipped():
    env = envs.make("space_invaders", 1)  # invaders are worth 5 to 30 points
    log, (scores, _) = play_until_game_over(env)
    raw, clipped = np.array(log["raw"]), np.array(log["reward"])
    assert raw.max() >= 5
    np.testing.assert_array_equal(clipped, np.sign(raw))
    np.testing.assert_allclose(scores[0], raw.sum())
    assert scores[0] > clipped.sum()


def test_unclipped_option():
    env = envs.make("space_invaders", 1, clip_rewards=False)
    log, _ = play_until_game_over(env)
    np.testing.assert_array_equal(log["reward"], log["raw"])


def test_truncation_is_not_termination_and_next_step_resets():
    env = envs.make("breakout", 1, max_episode_frames=400)  # 100 agent steps
    env.reset(seed=0)
    steps = 0
    while steps < 200:
        obs, _, terminated, truncated, info = env.step(np.array([0], np.int32))  # never FIRE
        steps += 1
        if truncated[0]:
            break
    assert truncated[0] and not terminated[0]
    assert steps <= 101
    obs, reward, terminated, truncated, info = env.step(np.array([0], np.int32))
    assert not obs[0, :3].any()  # the autoreset step starts a new, zero-padded stack
    assert reward[0] == 0 and info["lives"][0] == 5


def test_sticky_actions_option():
    spec = envs.parse_atari_id("ALE/Breakout-v5")
    assert spec.repeat_action_probability == 0.25
    with pytest.raises(ValueError, match="repeat_action_probability"):
        envs.make("breakout", 1, repeat_action_probability=1.5)


def test_classic_control():
    env = envs.make("CartPole-v1", 3)
    obs, info = env.reset(seed=0)
    assert obs.shape == (3, 4) and obs.dtype == np.float32
    assert not info["life_lost"].any()
    rng = np.random.default_rng(0)
    total = np.zeros(3)
    for _ in range(300):
        _, reward, terminated, truncated, info = env.step(rng.integers(0, 2, 3))
        total += reward
        assert reward.dtype == np.float32
        scores, lengths = envs.episode_stats(info)
        if len(scores):
            np.testing.assert_array_equal(scores, lengths)  # +1 per step
            return
    raise AssertionError("no CartPole episode ended in 300 random steps")


def test_atari_through_rollout_and_replay_matches_env_observations():
    """Stacks the replay memory rebuilds equal the env's own, across resets and lives."""
    num_envs = 2
    env = envs.make("breakout", num_envs, max_episode_frames=600)  # episodes end often
    memory = fdqn.ReplayMemory(2_000, num_envs, (4, 84, 84), np.uint8, frame_stack=4, seed=0)
    model = fdqn.nature_cnn(4)
    q_fn, params = fdqn.pure_q_fn(model)
    rollout = fdqn.Rollout(env, q_fn, memory, seed=1)
    seen, count = set(), 0
    obs = rollout.obs
    ended = np.zeros(num_envs, bool)
    for t in range(400):
        rollout.step(params, epsilon=1.0 if t % 2 else 0.5)
        for e in range(num_envs):
            if not ended[e]:
                seen.add((obs[e].tobytes(), rollout.obs[e].tobytes()))
                count += 1
        obs = rollout.obs
        ended = rollout.ended
    assert len(memory) == count > 780  # a few steps only reset an env
    assert count < 800
    batch = memory.sample(len(memory))
    for o, n in zip(batch.obs, batch.next_obs):
        assert (o.tobytes(), n.tobytes()) in seen
    assert rollout.agent_steps == 800


@pytest.mark.parametrize("env_id", ["CartPole-v1", "breakout"])
def test_episode_statistics_match_gymnasiums_wrapper(env_id):
    """fdqn's lean statistics give what gymnasium's RecordEpisodeStatistics gives."""
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    num_envs, steps = 3, 600 if env_id == "CartPole-v1" else 400
    if env_id == "breakout":  # short games (time limit) and raw rewards, as the wrapper sees them
        make_base = lambda: AtariVectorEnv(  # noqa: E731
            "breakout", num_envs, max_num_frames_per_episode=500, reward_clipping=False
        )
    else:
        make_base = lambda: gym.make_vec(env_id, num_envs=num_envs)  # noqa: E731
    ours, theirs = envs._EpisodeStatistics(make_base()), RecordEpisodeStatistics(make_base())
    ours.reset(seed=5)
    theirs.reset(seed=5)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(steps):
        actions = rng.integers(0, int(ours.single_action_space.n), num_envs)
        *_, info = ours.step(actions)
        *_, reference = theirs.step(actions)
        assert ("_episode" in info) == ("_episode" in reference)
        if "_episode" in info:
            np.testing.assert_array_equal(info["_episode"], reference["_episode"])
            for field in ("r", "l"):
                np.testing.assert_array_equal(info["episode"][field], reference["episode"][field])
            ended += int(info["_episode"].sum())
    assert ended >= 5  # the comparison covered several game ends and the resets after them


@pytest.mark.parametrize("env_id", ["breakout", "CartPole-v1"])
def test_split_steps_give_what_whole_steps_give(env_id):
    whole, split = envs.make(env_id, 2), envs.make(env_id, 2)
    for env in (whole, split):
        env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(150):
        actions = rng.integers(0, int(whole.single_action_space.n), 2)
        expected = whole.step(actions)
        split.send(actions)
        got = split.recv()
        for a, b in zip(got[:4], expected[:4]):
            np.testing.assert_array_equal(a, b)
        assert got[4].keys() == expected[4].keys()
        np.testing.assert_array_equal(got[4]["life_lost"], expected[4]["life_lost"])
        np.testing.assert_array_equal(got[4]["raw_reward"], expected[4]["raw_reward"])


def test_recv_without_send_is_an_error():
    env = envs.make("CartPole-v1", 1)
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match="recv\\(\\) without a send\\(\\)"):
        env.recv()
