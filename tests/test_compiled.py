"""The compiled run: the on-device replay, gymnax environments, one scan per run, many seeds."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from fdqn.config import Config
from fdqn.device_replay import ring_add, ring_init, ring_sample, ring_size
from fdqn.learner import Batch

gymnax = pytest.importorskip("gymnax", reason="the compiled run's environments need gymnax")

from fdqn import jax_envs  # noqa: E402
from fdqn.compiled import make_run  # noqa: E402

# -- the replay ring ------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    num_envs=st.integers(1, 3),
    per_env=st.integers(1, 5),
    steps=st.integers(1, 14),
    seed=st.integers(0, 2**16),
)
def test_ring_holds_the_newest_transitions_of_each_env_like_a_naive_buffer(
    num_envs, per_env, steps, seed
):
    rng = np.random.default_rng(seed)
    ring = ring_init(num_envs * per_env, num_envs, (2,))
    naive = [[] for _ in range(num_envs)]  # whole transitions, newest last
    for _ in range(steps):
        batch = Batch(
            obs=rng.normal(size=(num_envs, 2)).astype(np.float32),
            action=rng.integers(0, 4, num_envs),
            reward=rng.normal(size=num_envs).astype(np.float32),
            next_obs=rng.normal(size=(num_envs, 2)).astype(np.float32),
            terminated=rng.random(num_envs) < 0.3,
        )
        ring = jax.jit(ring_add)(ring, batch)
        for e in range(num_envs):
            naive[e].append(tuple(np.asarray(field[e]) for field in batch))
            naive[e] = naive[e][-per_env:]
    assert int(ring_size(ring)) == sum(len(n) for n in naive)
    for e in range(num_envs):
        held = {
            tuple(np.asarray(f[e, c]).tobytes() for f in ring[:5])
            for c in range(min(steps, per_env))
        }
        want = {
            tuple(np.asarray(x, f.dtype).tobytes() for x, f in zip(t, ring[:5])) for t in naive[e]
        }
        assert held == want
    sample = ring_sample(ring, jax.random.key(seed), 64)
    stored = {
        tuple(np.asarray(x, f.dtype).tobytes() for x, f in zip(t, ring[:5]))
        for n in naive
        for t in n
    }
    for i in range(64):
        assert tuple(np.asarray(f[i]).tobytes() for f in sample) in stored


def test_ring_refuses_bad_sizes():
    with pytest.raises(ValueError, match="capacity must be at least num_envs"):
        ring_init(2, 4, (3,))
    with pytest.raises(ValueError, match="obs_shape must be one or more"):
        ring_init(8, 2, ())
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        ring_init(True, 1, (3,))


# -- gymnax environments ---------------------------------------------------------------


def test_gymnax_cartpole_follows_gymnasium_dynamics_on_the_same_actions():
    env = jax_envs.make("CartPole-v1", 1)
    obs, state = env.reset(jax.random.key(0))
    reference = gym.make("CartPole-v1").unwrapped
    reference.reset(seed=0)
    reference.state = np.asarray(obs[0], np.float64)
    actions = np.random.default_rng(0).integers(0, 2, 200)
    for t, action in enumerate(actions):
        out = env.step(jax.random.key(t), state, jnp.asarray([action], jnp.int32))
        ref_obs, ref_reward, ref_terminated, _, _ = reference.step(int(action))
        np.testing.assert_allclose(out.final_obs[0], ref_obs, rtol=1e-4, atol=1e-5)
        assert float(out.reward[0]) == ref_reward
        assert bool(out.terminated[0]) == ref_terminated
        if ref_terminated:
            break
        state = out.state
    assert ref_terminated, "the random actions should end the episode within 200 steps"


def test_gymnax_time_limit_is_truncation_not_termination():
    env = jax_envs.make("CartPole-v1", 2)
    short = env.params.replace(max_steps_in_episode=3)
    env = jax_envs.JaxVecEnv("CartPole-v1", 2, env.env, short, env.obs_shape, env.num_actions)
    obs, state = env.reset(jax.random.key(0))
    for t in range(3):
        out = env.step(jax.random.key(t), state, jnp.zeros(2, jnp.int32))
        state = out.state
    assert out.truncated.tolist() == [True, True] and out.terminated.tolist() == [False, False]
    assert not np.array_equal(out.obs, out.final_obs)  # reset in the same step


def test_unknown_jax_env_id_and_missing_gymnax_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown JAX env id 'Pong-v5'"):
        jax_envs.make("Pong-v5", 1)
    code = (
        "import sys; sys.modules['gymnax'] = None\n"
        "import fdqn, fdqn.compiled, fdqn.jax_envs as j\n"
        "try:\n    j.make('CartPole-v1', 1)\n"
        "except j.GymnaxMissing as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pip install -e '.[gymnax]'" in result.stdout


# -- the compiled run ------------------------------------------------------------------

TINY = Config(
    env="CartPole-v1", network="mlp", hidden=(16, 16), num_envs=4, total_steps=2_000, lr=1e-3,
    batch_size=16, buffer_size=400, learning_starts=40, train_every=2, target_update=30,
    clip="global", epsilon_end=0.05, exploration_fraction=0.5, eval_every=0, checkpoint_every=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return make_run(TINY)


def test_counters_follow_the_schedule_of_updates_and_syncs(tiny):
    state, metrics = tiny.run(tiny.init(1), 25)  # 100 agent steps, 4 per step
    c = state.counters
    assert int(c.agent_steps) == 100
    # an update every 2 agent steps from step 40 on: (100 - 40) // 2 + 1
    assert int(c.updates) == 31 and int(state.learner.step) == 31
    assert int(c.target_syncs) == 100 // 30
    assert int(c.episodes) == int(np.sum(metrics.done))
    assert metrics.agent_steps.tolist() == list(range(4, 101, 4))
    # no learner figures before the first update (agent step 40 is the 10th step)
    assert np.isnan(metrics.learner["loss"][8]) and np.isfinite(metrics.learner["loss"][9])
    finished = metrics.episode_return[metrics.done]
    assert np.all(finished >= 1) and np.all(finished == metrics.episode_length[metrics.done])


def test_the_same_steps_eagerly_give_the_same_state(tiny):
    learning, _ = tiny.run(tiny.init(2), 25)  # past learning_starts: each step updates
    jitted = jax.jit(tiny.step)
    eager = compiled_ = learning
    compiled_, _ = jitted(compiled_)
    with jax.disable_jit():  # slow: every operation dispatched on its own
        eager, _ = tiny.step(eager)
    # one more step of 4 agent steps, an update every 2: 31 + 2
    assert int(eager.counters.updates) == int(compiled_.counters.updates) == 33
    for a, b in zip(
        jax.tree.leaves(eager.learner.params), jax.tree.leaves(compiled_.learner.params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(eager.replay.action, compiled_.replay.action)
    np.testing.assert_allclose(eager.obs, compiled_.obs, rtol=1e-5, atol=1e-6)


def test_seeds_in_one_program_equal_single_seed_runs_and_differ_from_each_other(tiny):
    seeds = [3, 5, 7]
    together, metrics = tiny.run(tiny.init(seeds), 25)
    for i, seed in enumerate(seeds):
        alone, alone_metrics = tiny.run(tiny.init(seed), 25)
        for a, b in zip(
            jax.tree.leaves(alone.learner.params), jax.tree.leaves(together.learner.params)
        ):
            # batched matmuls round differently in the last bits, nothing more
            np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(alone_metrics.done, metrics.done[i])
        np.testing.assert_array_equal(alone_metrics.episode_return, metrics.episode_return[i])
    first = jax.tree.leaves(together.learner.params)[0]
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])
    done, episode_return = np.asarray(metrics.done), np.asarray(metrics.episode_return)
    returns = [tuple(episode_return[i][done[i]].tolist()) for i in range(3)]
    assert len(set(returns)) == 3


def test_episode_unit_target_syncs_count_episodes():
    run = make_run(TINY.replace(target_update_unit="episodes", target_update=3))
    state, metrics = run.run(run.init(1), 40)
    episodes = int(state.counters.episodes)
    assert episodes == int(np.sum(metrics.done)) > 3
    assert int(state.counters.target_syncs) == -(-episodes // 3)  # after episodes 0, 3, 6, ...


# -- the command line ------------------------------------------------------------------


def test_num_seeds_trains_them_in_one_program_from_the_command_line(tmp_path, capsys):
    from fdqn import reporting, train

    run_dir = str(tmp_path / "run")
    code = train.main(["--preset", "cartpole", "--num-seeds", "2", "--seed", "4",
                       "--total-steps", "400", "--learning-starts", "100", "--hidden", "16,16",
                       "--buffer-size", "1000", "--eval-every", "200", "--log-every", "200",
                       "--eval-episodes", "2", "--run-dir", run_dir,
                       "--no-cpu-tuning"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["seeds"] == [4, 5]
    assert summary["agent_steps"] == 400 and len(summary["final_eval"]) == 2
    assert "400/400 steps per seed" in captured.err
    rows = reporting.read_csv(os.path.join(run_dir, "metrics.csv"))
    assert set(rows["seed"].tolist()) == {4.0, 5.0}
    evals = reporting.read_csv(os.path.join(run_dir, "eval.csv"))
    assert evals["step"].tolist() == [200, 200, 400, 400]
    np.testing.assert_allclose(evals["mean"][2:], summary["final_eval"])
    for name in ("model-seed4.keras", "model-seed5.keras", "learning_curve.png", "config.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    # fdqn.evaluate plays every seed of the newest checkpoint: the parameters of the model files
    import keras

    from fdqn import evaluate
    from fdqn.config import load_config
    from fdqn.networks import pure_q_fn

    capsys.readouterr()
    assert evaluate.main([run_dir, "--episodes", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["seeds"] == [4, 5] and report["step"] == 400 and report["episodes"] == 2
    files = [os.path.join(run_dir, f"model-seed{s}.keras") for s in (4, 5)]
    models = [pure_q_fn(keras.saving.load_model(f))[1] for f in files]
    stacked = [np.stack(ws) for ws in zip(*models)]
    config = load_config(run_dir)
    scores = evaluate.evaluate_seeds(config, stacked, 2, config.eval_epsilon, 12345)
    np.testing.assert_array_equal(scores.mean(axis=1), report["seed_means"])
    # a resume of a finished run trains nothing more and changes nothing
    before = open(os.path.join(run_dir, "eval.csv")).read()
    assert train.main(["--resume", run_dir, "--no-cpu-tuning"]) == 0
    assert "is at agent step 400 of --total-steps 400: nothing to train" in capsys.readouterr().err
    assert open(os.path.join(run_dir, "eval.csv")).read() == before


def test_a_resumed_seeds_run_is_bit_identical_to_a_straight_one(tmp_path, capsys):
    from fdqn import checkpoint, train

    # an exponential epsilon schedule does not depend on --total-steps, which the resume raises
    args = ["--preset", "cartpole", "--num-seeds", "2", "--hidden", "16,16",
            "--buffer-size", "1000", "--learning-starts", "100", "--eval-every", "0",
            "--log-every", "100", "--checkpoint-every", "100", "--epsilon-schedule",
            "exponential", "--epsilon-decay", "200", "--no-cpu-tuning"]  # fmt: skip
    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    assert train.main([*args, "--run-dir", straight, "--total-steps", "400"]) == 0
    assert train.main([*args, "--run-dir", halves, "--total-steps", "200"]) == 0
    code = train.main(["--resume", halves, "--total-steps", "400", "--no-cpu-tuning"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"resumed from {checkpoint.path_of(halves, 200)}" in err
    a, _ = checkpoint.load(checkpoint.path_of(straight, 400))
    b, _ = checkpoint.load(checkpoint.path_of(halves, 400))
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    rows = [open(os.path.join(d, "metrics.csv")).read() for d in (straight, halves)]
    assert rows[0] == rows[1]


def test_num_seeds_must_be_positive(tmp_path, capsys):
    from fdqn import train

    code = train.main(["--num-seeds", "0", "--run-dir", str(tmp_path / "r"), "--no-cpu-tuning"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fdqn.train: error: --num-seeds: must be a positive integer, got 0"]
    assert not os.path.exists(tmp_path / "r")


def test_sigint_checkpoints_a_seeds_run_and_resume_continues_it(tmp_path, monkeypatch, capsys):
    import signal

    from fdqn import checkpoint, seed_runs, train

    real = seed_runs._write_episodes
    calls = []

    def write_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C after the second chunk
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(seed_runs, "_write_episodes", write_then_interrupt)
    run_dir = str(tmp_path / "run")
    args = ["--preset", "cartpole", "--num-seeds", "2", "--hidden", "16,16", "--eval-every", "0",
            "--buffer-size", "1000", "--learning-starts", "100", "--log-every", "100",
            "--total-steps", "600", "--no-cpu-tuning"]  # fmt: skip
    assert train.main([*args, "--run-dir", run_dir]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"SIGINT at agent step 200: checkpoint {checkpoint.path_of(run_dir, 200)}; "
        f"continue with: python -m fdqn.train --resume {run_dir}"
    )
    monkeypatch.setattr(seed_runs, "_write_episodes", real)
    assert train.main(["--resume", run_dir, "--no-cpu-tuning"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["agent_steps"] == 600 and summary["status"] == "finished"


# -- MinAtar (gymnax) ------------------------------------------------------------------


def test_minatar_runs_compiled_with_its_network_and_a_uint8_replay():
    config = Config(
        env="Breakout-MinAtar", network="minatar", num_envs=2, total_steps=1_000,
        batch_size=8, buffer_size=200, learning_starts=50, train_every=2, target_update=50,
        epsilon_end=1.0, eval_every=0, checkpoint_every=0,
    ).validate()  # fmt: skip
    run = make_run(config)
    assert run.model.name == "minatar_cnn" and run.env.obs_shape == (10, 10, 4)
    state = run.init([1, 2])
    assert state.replay.obs.dtype == jnp.uint8
    before = [np.asarray(p) for p in state.learner.params]
    state, metrics = run.run(state, 100)
    done = np.asarray(metrics.done)
    assert done.sum() > 0  # random Breakout games end within 100 steps
    assert int(state.counters.updates[0]) == (200 - 50) // 2 + 1
    # MinAtar grids are 0/1: the uint8 replay holds them exactly
    held = np.asarray(state.replay.obs)
    assert set(np.unique(held)) <= {0, 1} and held.max() == 1
    after = [np.asarray(p) for p in state.learner.params]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before))
    assert not np.array_equal(after[0][0], after[0][1])  # the two seeds learn apart


def test_minatar_needs_its_network():
    from fdqn.config import ConfigError

    with pytest.raises(ConfigError, match="--network: Breakout-MinAtar is a MinAtar game"):
        Config(env="Breakout-MinAtar", network="mlp").validate()
    with pytest.raises(ConfigError, match="--network: breakout gives images"):
        Config(env="breakout", network="minatar").validate()


@pytest.mark.slow
def test_the_minatar_preset_trains_compiled_from_the_command_line(tmp_path, capsys):
    from fdqn import train

    run_dir = str(tmp_path / "run")
    code = train.main(["--preset", "minatar", "--total-steps", "320", "--learning-starts", "80",
                       "--buffer-size", "400", "--eval-every", "0", "--log-every", "160",
                       "--eval-episodes", "2", "--run-dir", run_dir,
                       "--no-cpu-tuning"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["seeds"] == [1]
    assert summary["agent_steps"] == 320 and len(summary["final_eval"]) == 1
    assert os.path.isfile(os.path.join(run_dir, "model-seed1.keras"))


def test_a_run_refilling_its_replay_skips_the_updates_owed_meanwhile(tiny):
    state, _ = tiny.run(tiny.init(1), 50)  # 200 agent steps: (200 - 40) // 2 + 1 updates
    assert int(state.counters.updates) == 81
    refill = tiny.refilling(state.counters)
    # no updates for learning_starts (40) agent steps; the 19 owed by then are skipped
    assert (refill.learning_from, refill.updates_skipped) == (240, 101 - 1 - 81)
    empty = tiny.init(1).replay
    state, metrics = refill.run(state._replace(replay=empty), 10)  # agent steps 204-240
    assert metrics.updates.tolist() == [81] * 9 + [82]  # the first update at step 240
    state, _ = refill.run(state, 1)
    assert int(state.counters.updates) == 84  # then one every 2 agent steps, as before
