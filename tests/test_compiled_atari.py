"""Atari in compiled runs: ale-py's XLA calls against its host vector env, and a short run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdqn import envs, jax_envs
from fdqn.config import Config
from fdqn.compiled import make_run


def test_xla_steps_are_the_host_env_steps_with_next_step_autoreset_and_life_loss():
    n, steps = 2, 400
    host = envs.make("BreakoutNoFrameskip-v4", n, clip_rewards=True)
    host_obs, host_info = host.reset(seed=7)
    env = jax_envs.make_atari("BreakoutNoFrameskip-v4", n)
    handle, (obs, info) = env.xla_reset(env.handle, seed=jnp.asarray([7, 8], jnp.int32))
    state = jax_envs.AtariXlaState(handle, info["lives"], jnp.zeros(n, bool))
    np.testing.assert_array_equal(obs, host_obs)
    step = jax.jit(env.step)
    actions = np.random.default_rng(0).integers(0, env.num_actions, (steps, n))
    ended = np.zeros(n, bool)
    seen = dict(life_lost=0, game_over=0, resets=0)
    for t in range(steps):
        out = step(jax.random.key(t), state, jnp.asarray(actions[t], jnp.int32))
        host_obs, reward, terminated, truncated, info = host.step(actions[t])
        np.testing.assert_array_equal(out.obs, host_obs)
        np.testing.assert_array_equal(out.valid, ~ended)
        np.testing.assert_array_equal(out.score, np.where(ended, 0, info["raw_reward"]))
        np.testing.assert_array_equal(out.reward, np.where(ended, 0, reward))
        np.testing.assert_array_equal(out.terminated, ~ended & (terminated | info["life_lost"]))
        np.testing.assert_array_equal(out.done, ~ended & (terminated | truncated))
        seen["life_lost"] += int(np.sum(~ended & info["life_lost"] & ~terminated))
        seen["game_over"] += int(np.sum(out.done))
        seen["resets"] += int(np.sum(ended))
        ended = np.asarray(out.done)
        state = out.state
    # random play loses lives and whole games within 400 steps: every branch above ran
    assert seen["life_lost"] > 0 and seen["game_over"] > 0 and seen["resets"] > 0, seen


def test_lost_life_is_not_terminal_when_asked():
    env = jax_envs.make_atari("breakout", 1, terminal_on_life_loss=False)
    obs, state = env.reset(jax.random.key(0))
    step = jax.jit(env.step)
    lost = 0
    for t in range(300):
        out = step(jax.random.key(t), state, jnp.asarray([t % 4], jnp.int32))
        life = bool(out.state.lives[0] < state.lives[0]) and bool(out.valid[0])
        if life and not bool(out.done[0]):
            lost += 1
            assert not bool(out.terminated[0])
        state = out.state
    assert lost > 0


def test_not_an_atari_id_is_a_one_line_error():
    with pytest.raises(ValueError, match="'CartPole-v1' is not an Atari game id"):
        jax_envs.make_atari("CartPole-v1", 1)


def test_a_short_compiled_breakout_run_learns_from_its_frame_ring_and_reports_true_scores():
    config = Config(
        env="BreakoutNoFrameskip-v4", network="nature", num_envs=2, total_steps=1_000,
        buffer_size=600, batch_size=8, learning_starts=100, train_every=4, target_update=100,
        epsilon_end=1.0,  # random play: games end (a greedy start may never press FIRE)
        eval_every=0, checkpoint_every=0,
    )  # fmt: skip
    run = make_run(config)
    state = run.init(3)
    before = jax.tree.map(np.asarray, state.learner.params)
    state, metrics = run.run(state, 250)
    counters = jax.tree.map(int, state.counters)
    assert counters.agent_steps == 500
    assert counters.updates == (500 - 100) // 4 + 1
    assert counters.target_syncs == 5
    ring = state.replay
    assert int(ring.writes) == 251 and ring.frames.shape == (2, 300 + 4, 84, 84)  # not yet wrapped
    # every game's start is marked in the ring, the one at step 0 and each reset after a game
    done = np.asarray(metrics.done)
    first = np.asarray(ring.first)
    assert first[:, 0].all() and first.sum() == 2 + done[:-1].sum()
    # the games' true scores are sums of Breakout's points (1, 4 or 7), never clipped ones only
    returns = np.asarray(metrics.episode_return)[done]
    assert done.sum() >= 1 and np.all(returns >= 0) and np.all(returns == np.round(returns))
    assert np.isfinite(np.asarray(metrics.learner["loss"])[-1])
    after = jax.tree.map(np.asarray, state.learner.params)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
    scores = run.evaluate(state.learner.params, jax.random.key(0), 2, 0.05)
    assert scores.shape == (2,) and np.all(np.asarray(scores) >= 0)


def test_several_seeds_on_atari_are_refused():
    config = Config(env="breakout", num_envs=1, buffer_size=100, batch_size=8, total_steps=100)
    with pytest.raises(ValueError, match="Atari: one seed per run"):
        make_run(config).init([1, 2])
