"""Atari and gymnasium envs in compiled runs: ale-py's XLA calls and host callbacks
against the host vector envs, and short runs."""

import json
import os

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdqn import envs, jax_envs
from fdqn.compiled import make_run
from fdqn.config import Config


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
    assert any(
        np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))
    )
    scores = run.evaluate(state.learner.params, jax.random.key(0), 2, 0.05)
    assert scores.shape == (2,) and np.all(np.asarray(scores) >= 0)


def test_atari_seeds_in_one_vector_env_equal_single_seed_runs_and_differ():
    # 2 seeds x 2 games: one vector env of 4, a block of 2 per seed, the learners vmapped
    config = Config(
        env="breakout", num_envs=2, num_seeds=2, total_steps=1_000, buffer_size=200,
        batch_size=4, learning_starts=8, train_every=4, target_update=12, epsilon_end=1.0,
        eval_every=0, checkpoint_every=0,
    )  # fmt: skip
    run = make_run(config)
    assert (run.env.num_envs, run.num_envs, run.blocks) == (4, 2, 2)
    seeds = [4, 9]
    together, metrics = run.run(run.init(seeds), 30)
    assert int(together.counters.updates[1]) == (60 - 8) // 4 + 1
    keys = jax.random.split(jax.random.key(0), 2)
    scores = np.asarray(run.evaluate(together.learner.params, keys, 1, 0.5))
    one = make_run(config.replace(num_seeds=1))
    for i, seed in enumerate(seeds):
        alone, alone_metrics = one.run(one.init(seed), 30)
        # the same games: the same frames, actions and episode ends, bit for bit
        np.testing.assert_array_equal(alone.replay.frames, together.replay.frames[i])
        np.testing.assert_array_equal(alone.replay.action, together.replay.action[i])
        np.testing.assert_array_equal(alone_metrics.done, metrics.done[i])
        for a, b in zip(alone.learner.params, together.learner.params):
            # batched convolutions round differently in the last bits, nothing more
            np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6)
        alone_score = one.evaluate(alone.learner.params, keys[i], 1, 0.5)
        np.testing.assert_array_equal(alone_score, scores[i])
    frames = np.asarray(together.replay.frames)
    assert not np.array_equal(frames[0], frames[1])
    assert not np.allclose(together.learner.params[0][0], together.learner.params[0][1])
    # a resumed run's new games: every seed's block marked as a start in its own ring
    writes = int(together.replay.writes[0])
    restarted = run.restart_envs(together)  # donates together's buffers
    assert restarted.obs.shape == (2, 2, 4, 84, 84)
    np.testing.assert_array_equal(np.asarray(restarted.replay.first)[:, :, writes], True)


def test_host_env_runs_take_as_many_seeds_as_their_env_was_made_for():
    config = Config(env="breakout", num_envs=1, buffer_size=100, batch_size=8, total_steps=100)
    with pytest.raises(ValueError, match=r"init it with 1 seed\(s\), got \[1, 2\]"):
        make_run(config).init([1, 2])
    with pytest.raises(ValueError, match=r"the env holds 3 games; 2 seed\(s\) of --num-envs 1"):
        make_run(config.replace(num_seeds=2), env=jax_envs.make_callback("CartPole-v1", 3))


# -- gymnasium through host callbacks --------------------------------------------------


def test_callback_steps_are_gymnasium_steps_with_same_step_autoreset():
    n = 3
    env = jax_envs.make_callback("CartPole-v1", n)
    reference = gym.make_vec(
        "CartPole-v1", num_envs=n, vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
    )  # fmt: skip
    obs, state = jax.jit(env.reset)(jax.random.key(5))
    seed = int(jax.random.randint(jax.random.key(5), (), 0, 2**31 - 1, dtype=jnp.int32))
    ref_obs, _ = reference.reset(seed=seed)
    np.testing.assert_array_equal(obs, ref_obs)
    step = jax.jit(env.step)
    actions = np.random.default_rng(0).integers(0, 2, (120, n))
    ends = 0
    for t in range(120):
        out = step(jax.random.key(t), state, jnp.asarray(actions[t], jnp.int32))
        ref_obs, reward, terminated, truncated, info = reference.step(actions[t])
        np.testing.assert_array_equal(out.obs, ref_obs)
        np.testing.assert_array_equal(out.reward, reward)
        np.testing.assert_array_equal(out.terminated, terminated)
        np.testing.assert_array_equal(out.done, terminated | truncated)
        for i in np.flatnonzero(terminated):  # the ended episode's last observation, not the reset
            np.testing.assert_array_equal(out.final_obs[i], info["final_obs"][i])
            assert not np.array_equal(out.final_obs[i], out.obs[i])
            ends += 1
        assert int(out.state) == t + 1
        state = out.state
    assert ends > 0


def test_a_compiled_run_on_host_callbacks_counts_episodes_and_learns():
    config = Config(
        env="CartPole-v1", network="mlp", hidden=(16, 16), num_envs=4, total_steps=2_000,
        batch_size=16, buffer_size=400, learning_starts=40, train_every=2, target_update=30,
        eval_every=0, checkpoint_every=0,
    )  # fmt: skip
    run = make_run(config, env=jax_envs.make_callback("CartPole-v1", 4))
    state = run.init(1)
    before = [np.asarray(p) for p in state.learner.params]
    state, metrics = run.run(state, 200)
    done = np.asarray(metrics.done)
    # CartPole pays 1 per step: every finished episode's return is its length
    np.testing.assert_array_equal(
        np.asarray(metrics.episode_return)[done], np.asarray(metrics.episode_length)[done]
    )
    assert int(state.counters.episodes) == done.sum() > 0
    assert int(state.counters.updates) == (800 - 40) // 2 + 1
    assert any(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(state.learner.params, before))
    scores = np.asarray(run.evaluate(state.learner.params, jax.random.key(0), 3, 0.0))
    assert scores.shape == (3,) and np.all(scores >= 8)  # CartPole never ends before step 8


def test_callback_seeds_in_one_vector_env_equal_single_seed_runs():
    config = Config(
        env="CartPole-v1", network="mlp", hidden=(16, 16), num_envs=3, num_seeds=2,
        total_steps=2_000, batch_size=16, buffer_size=400, learning_starts=40, train_every=2,
        target_update=30, eval_every=0, checkpoint_every=0,
    )  # fmt: skip
    run = make_run(config, env=jax_envs.make_callback("CartPole-v1", 6))
    together, metrics = run.run(run.init([4, 9]), 60)
    keys = jax.random.split(jax.random.key(0), 2)
    scores = np.asarray(run.evaluate(together.learner.params, keys, 3, 0.0))
    one = make_run(config.replace(num_seeds=1), env=jax_envs.make_callback("CartPole-v1", 3))
    for i, seed in enumerate([4, 9]):
        alone, alone_metrics = one.run(one.init(seed), 60)
        np.testing.assert_array_equal(alone_metrics.done, metrics.done[i])
        np.testing.assert_array_equal(alone_metrics.episode_return, metrics.episode_return[i])
        for a, b in zip(alone.learner.params, together.learner.params):
            np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6)
        alone_scores = one.evaluate(alone.learner.params, keys[i], 3, 0.0)
        np.testing.assert_array_equal(alone_scores, scores[i])
    returns = np.asarray(metrics.episode_return)[np.asarray(metrics.done)]
    assert len(returns) > 2
    assert not np.array_equal(np.asarray(metrics.done)[0], np.asarray(metrics.done)[1])


def test_callback_env_refuses_what_dqn_cannot_take():
    with pytest.raises(ValueError, match="DQN needs a Discrete one"):
        jax_envs.make_callback("Pendulum-v1", 1)
    with pytest.raises(ValueError, match="is Atari"):
        jax_envs.make_callback("BreakoutNoFrameskip-v4", 1)


@pytest.mark.slow
def test_two_seeds_train_breakout_compiled_from_the_command_line_and_resume(tmp_path, capsys):
    import json

    from fdqn import train

    run_dir = str(tmp_path / "run")
    args = ["--env", "breakout", "--num-seeds", "2", "--num-envs", "2", "--buffer-size", "400",
            "--batch-size", "8", "--learning-starts", "100", "--eval-every", "0",
            "--checkpoint-every", "200", "--log-every", "100", "--eval-episodes", "1",
            "--epsilon-end", "1.0", "--no-cpu-tuning"]  # fmt: skip
    assert train.main([*args, "--total-steps", "200", "--run-dir", run_dir]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["agent_steps"] == 200
    assert train.main(["--resume", run_dir, "--total-steps", "400", "--no-cpu-tuning"]) == 0
    captured = capsys.readouterr()
    assert "(the environments start new games)" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["agent_steps"] == 400
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        assert f.readline().strip() == "step,seed,episode,score,length,epsilon,loss"
    assert os.path.isfile(os.path.join(run_dir, "model-seed1.keras"))
    assert os.path.isfile(os.path.join(run_dir, "model-seed2.keras"))


@pytest.mark.slow
def test_atari_steps_eagerly_and_in_the_compiled_scan_give_the_same_state():
    config = Config(
        env="breakout", num_envs=2, total_steps=1_000, buffer_size=200, batch_size=4,
        learning_starts=8, train_every=4, target_update=12, epsilon_end=1.0,
        eval_every=0, checkpoint_every=0,
    )  # fmt: skip
    compiled, eager = make_run(config), make_run(config)  # two sets of emulators
    state_c, state_e = compiled.init(5), eager.init(5)
    state_c, _ = compiled.run(state_c, 10)
    with jax.disable_jit():
        for _ in range(10):
            state_e, _ = eager.step(state_e)
    assert int(state_c.counters.updates) == int(state_e.counters.updates) == (20 - 8) // 4 + 1
    np.testing.assert_array_equal(state_c.replay.frames, state_e.replay.frames)
    np.testing.assert_array_equal(state_c.replay.action, state_e.replay.action)
    for c, e in zip(state_c.learner.params, state_e.learner.params):
        np.testing.assert_allclose(c, e, rtol=1e-4, atol=1e-6)


def test_gymnasium_seeds_checkpoint_without_the_replay_and_refill_it_on_resume(tmp_path, capsys):
    from fdqn import checkpoint, train

    run_dir = str(tmp_path / "run")
    args = ["--env", "CartPole-v0", "--network", "mlp", "--loop", "compiled", "--num-seeds", "2",
            "--num-envs", "2", "--hidden", "16,16", "--buffer-size", "400", "--batch-size", "16",
            "--learning-starts", "100", "--eval-every", "0", "--eval-episodes", "2",
            "--log-every", "200", "--checkpoint-every", "200", "--no-cpu-tuning"]  # fmt: skip
    assert train.main([*args, "--total-steps", "200", "--run-dir", run_dir]) == 0
    capsys.readouterr()
    arrays, meta = checkpoint.load(checkpoint.latest_checkpoint(run_dir))
    assert meta["replay"] is False
    assert sum(a.nbytes for a in arrays.values()) < 100_000  # the 400-transition rings left out
    assert train.main(["--resume", run_dir, "--total-steps", "400", "--no-cpu-tuning"]) == 0
    captured = capsys.readouterr()
    assert "the replay was not saved: it refills until agent step 300" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["seeds"] == [1, 2]
