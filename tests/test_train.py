"""The training program end to end, with tiny budgets."""

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from fdqn import checkpoint, cpu, replay, train
from fdqn.config import (
    FIELDS_ADDED_LATER,
    Config,
    ConfigError,
    load_config,
    preset,
    save_config,
)
from fdqn.evaluate import evaluate, load_run
from fdqn.evaluate import main as evaluate_main

CARTPOLE_TINY = dict(
    total_steps=600,
    train_every=1,
    learning_starts=100,
    buffer_size=1_000,
    eval_every=300,
    eval_episodes=2,
    checkpoint_every=300,
    log_every=200,
)


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fdqn.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def test_help_lists_every_field_with_default():
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "(default: 10000000)" in text and "(default: 0.0001)" in text


def test_unknown_flag_from_the_shell(tmp_path):
    result = run_cli("--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fdqn.train: error: unrecognized arguments: --no-such-flag (see --help)"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--buffer-size", "-5"], "--buffer-size: must be a positive integer, got -5"),
        (["--lr", "3"], "--lr: must be in (0, 1], got 3.0"),
        (["--lr", "abc"], "argument --lr: invalid float value"),
        (["--hidden", "64,x"], "argument --hidden: expected widths like 64,64"),
        (["--env", "Breakot-v4"], "--env: unknown env id 'Breakot-v4'"),
        (["--batch-size", "64", "--buffer-size", "32"], "--batch-size: must not exceed"),
        (["--preset", "cartpole", "--network", "nature"], "--network: CartPole-v1 gives vectors"),
        (["--gamma", "1.5"], "--gamma: must be in [0, 1]"),
        (["--preset", "nope"], "argument --preset: invalid choice"),
        (["--resume", "/nonexistent/run"], "/nonexistent/run does not exist"),
    ],
)
def test_bad_input_one_line_exit_2_and_nothing_written(
    tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    extra = [] if "--resume" in args else ["--run-dir", str(run_dir)]
    try:
        code = train.main([*args, *extra, "--no-cpu-tuning"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_replay_memory_larger_than_the_ram_is_one_line_and_nothing_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(replay, "available_memory", lambda: 1_000)
    code = train.main(
        ["--preset", "cartpole", "--run-dir", str(tmp_path / "run"), "--no-cpu-tuning"]
    )
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fdqn.train: CartPole-v1, run"), lines
    assert "replay memory of capacity 50,000 needs" in lines[1] and "buffer_size" in lines[1]
    assert list(tmp_path.iterdir()) == []


def test_no_prefault_replay_skips_the_up_front_ram_check(monkeypatch):
    monkeypatch.setattr(replay, "available_memory", lambda: 1_000)  # a prefault would be refused
    config = preset("cartpole").replace(prefault_replay=False, eval_every=0)
    built = train.build(config)
    try:
        assert len(built.memory) == 0 and built.memory.capacity == config.buffer_size
    finally:
        built.rollout.env.close()
    with pytest.raises(ValueError, match="replay memory of capacity 50,000 needs"):
        train.build(config.replace(prefault_replay=True))


def test_existing_run_dir_is_not_touched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    result = run_cli("--preset", "cartpole", "--run-dir", str(run_dir))
    assert result.returncode == 2
    assert "is not empty" in result.stderr
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


def test_cartpole_smoke_writes_everything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CARTPOLE_TINY.items()]
    result = run_cli("--preset", "cartpole", "--run-dir", str(run_dir), *args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["agent_steps"] == 600
    assert summary["updates"] == 501  # one per agent step from step 100 on
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "metrics.csv", "eval.csv", "checkpoints", "summary.json"} <= names
    assert "learning_curve.png" in names and "tb" in names
    assert "steps/s" in result.stderr  # plain progress lines without a terminal
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env"] == "CartPole-v1" and config["total_steps"] == 600
    assert len(checkpoint.list_checkpoints(str(run_dir))) == 2  # at 300 and 600
    evals = (run_dir / "eval.csv").read_text().strip().splitlines()
    assert len(evals) == 3  # header + 2 evaluations

    gif = str(tmp_path / "x.gif")
    assert evaluate_main([str(run_dir), "--episodes", "3", "--gif", gif]) == 2
    assert "--gif needs an Atari run" in capsys.readouterr().err
    assert evaluate_main([str(run_dir), "--episodes", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["episodes"] == 3 and report["step"] == 600

    # the trained network as a Keras model file, at the end and beside each checkpoint
    assert "model.keras" in names
    for path in checkpoint.list_checkpoints(str(run_dir)):
        assert os.path.isfile(os.path.join(path, "model.keras"))


LOAD_WITHOUT_FDQN = r"""
import json, sys
sys.modules["fdqn"] = None  # any import of fdqn fails
import keras, numpy as np
model = keras.saving.load_model(sys.argv[1])
obs = np.array([[0.01, -0.02, 0.03, 0.04]], np.float32)
print(json.dumps({"backend": keras.backend.backend(), "q": model.predict(obs, verbose=0).tolist()}))
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 300-step CartPole run through the command line: its directory and stderr."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CARTPOLE_TINY.items()]
    result = run_cli("--preset", "cartpole", "--run-dir", str(run_dir), *args, "--total-steps=300")
    assert result.returncode == 0, result.stderr
    return run_dir, result.stderr


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_model_file_loads_with_plain_keras_and_gives_the_trained_q_values(tiny_run, backend):
    if backend == "tensorflow":
        pytest.importorskip("tensorflow")
    run_dir, _ = tiny_run
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"} | {"KERAS_BACKEND": backend}
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_FDQN, str(run_dir / "model.keras")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert loaded.returncode == 0, loaded.stderr
    out = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert out["backend"] == backend
    config, q_fn, params, _ = load_run(str(run_dir))  # the checkpoint's parameters
    want = np.asarray(q_fn(params, np.array([[0.01, -0.02, 0.03, 0.04]], np.float32)))
    np.testing.assert_allclose(out["q"], want, rtol=1e-5, atol=1e-6)


def test_evaluate_plays_a_model_file(tiny_run, tmp_path, capsys):
    from fdqn import evaluate as evaluate_cli

    run_dir, _ = tiny_run
    for path in [run_dir / "model.keras", *sorted((run_dir / "checkpoints").glob("*/model.keras"))]:
        assert evaluate_cli.main([str(path), "--episodes", "2"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 2
    copied = tmp_path / "elsewhere.keras"
    copied.write_bytes((run_dir / "model.keras").read_bytes())
    assert evaluate_cli.main([str(copied), "--episodes", "2"]) == 2
    assert "give --env ENV_ID" in capsys.readouterr().err
    assert evaluate_cli.main([str(copied), "--env", "CartPole-v1", "--episodes", "2"]) == 0
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    assert evaluate_cli.main([str(tmp_path / "bad.keras"), "--env", "CartPole-v1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load Keras model file" in err[0]


def test_first_line_says_cpu_tuning_and_the_flag_turns_it_off(tiny_run, tmp_path, capsys):
    _, stderr = tiny_run
    first = stderr.splitlines()[0]
    if cpu.accelerator_installed():
        assert "CPU tuning" not in stderr
    else:
        assert (
            first.startswith("fdqn.train: CPU tuning on (XLA_FLAGS=") and "--no-cpu-tuning" in first
        )
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CARTPOLE_TINY.items()]
    code = train.main(["--preset", "cartpole", "--run-dir", str(tmp_path / "b"), *args,
                       "--total-steps=20", "--no-cpu-tuning"])  # fmt: skip
    assert code == 0
    assert "CPU tuning" not in capsys.readouterr().err


def test_breakout_smoke(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--run-dir", str(run_dir), "--total-steps", "256", "--num-envs", "4",
        "--learning-starts", "128", "--buffer-size", "2000", "--eval-every", "0",
        "--checkpoint-every", "0", "--save-replay",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["agent_steps"] == 256
    assert summary["updates"] == (256 - 128) // 4 + 1
    ckpt = checkpoint.latest_checkpoint(str(run_dir))
    assert os.path.exists(os.path.join(ckpt, "replay.npz"))
    gif = tmp_path / "game.gif"
    assert evaluate_main([str(run_dir), "--episodes", "1", "--gif", str(gif)]) == 0
    assert gif.read_bytes()[:6] == b"GIF89a"


def test_notebook_preset_prints_its_episode_lines(tmp_path, capsys):
    code = train.main(["--preset", "notebook", "--run-dir", str(tmp_path / "run"),
                       "--total-episodes", "1", "--learning-starts", "200",
                       "--no-cpu-tuning"])  # fmt: skip
    assert code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Episode 0 ")]
    assert len(lines) == 1 and "achieved score" in lines[0] and "training steps" in lines[0]


def tiny_cartpole(**changes):
    return preset("cartpole").replace(**{**CARTPOLE_TINY, **changes}).validate()


def test_resume_gives_the_same_parameters_as_straight_through(tmp_path):
    config = tiny_cartpole(total_steps=800, checkpoint_every=0, eval_every=0, save_replay=True)
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    straight = train.train(config, str(tmp_path / "a"), stream=open(os.devnull, "w"))
    first = train.train(config, str(tmp_path / "b"), stream=open(os.devnull, "w"), stop_at=350)
    assert first["agent_steps"] == 350
    resumed = train.train(config, str(tmp_path / "b"), resume=True, stream=open(os.devnull, "w"))
    assert resumed["agent_steps"] == 800 and resumed["updates"] == straight["updates"]
    for a, b in zip(jax.tree.leaves(straight["state"].params), resumed["state"].params):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(straight["state"].opt_state), jax.tree.leaves(resumed["state"].opt_state)
    ):
        np.testing.assert_array_equal(a, b)


def test_resume_without_replay_refills_before_updating(tmp_path):
    config = tiny_cartpole(total_steps=600, checkpoint_every=0, eval_every=0, save_replay=False)
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    stream = io.StringIO()
    first = train.train(config, run_dir, stream=stream, stop_at=300)
    assert first["updates"] == 201  # steps 100..300
    resumed = train.train(config, run_dir, resume=True, stream=stream)
    # no updates at steps 301..399 while 100 new transitions arrive, then one per step
    assert resumed["updates"] == 201 + 201
    assert "refills until agent step 400" in stream.getvalue()
    assert "environments restarted with new games" in stream.getvalue()


def test_resume_cli_continues_and_rejects_other_flags(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    args = ["--preset", "cartpole", "--run-dir", run_dir, "--total-steps", "300",
            "--learning-starts", "100", "--eval-every", "0", "--checkpoint-every", "0",
            "--no-cpu-tuning"]  # fmt: skip
    assert train.main(args) == 0
    assert train.main(["--resume", run_dir, "--lr", "0.1", "--no-cpu-tuning"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert train.main(["--resume", run_dir, "--total-steps", "500", "--no-cpu-tuning"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["agent_steps"] == 500


def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(tmp_path):
    run_dir = str(tmp_path / "run")
    config = tiny_cartpole(total_steps=200, checkpoint_every=0, eval_every=0)
    os.makedirs(run_dir)
    save_config(config, run_dir)
    train.train(config, run_dir, stream=open(os.devnull, "w"))
    path = checkpoint.latest_checkpoint(run_dir)
    arrays = os.path.join(path, "arrays.npz")
    with open(arrays, "wb") as f:
        f.write(b"garbage")
    result = run_cli("--resume", run_dir, "--total-steps", "400", "--no-cpu-tuning")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 2  # the run line, then the error
    assert "cannot be read" in result.stderr
    assert open(arrays, "rb").read() == b"garbage"
    assert checkpoint.list_checkpoints(run_dir) == [path]


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    run_dir = str(tmp_path / "run")
    config = tiny_cartpole(total_steps=200, checkpoint_every=0, eval_every=0)
    os.makedirs(run_dir)
    train.train(config, run_dir, stream=open(os.devnull, "w"))
    other = config.replace(hidden=(32,))
    with pytest.raises(checkpoint.CheckpointError, match="this run expects"):
        train.train(other, run_dir, resume=True, stream=open(os.devnull, "w"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    config = tiny_cartpole(total_steps=900, checkpoint_every=300, eval_every=0)
    os.makedirs(run_dir)
    real_update = train.update
    calls = []

    def diverging_update(state, batch, **kwargs):
        state, metrics = real_update(state, batch, **kwargs)
        calls.append(1)
        if len(calls) > 300:  # after the checkpoint at step 300
            metrics = dict(metrics, loss=metrics["loss"] * np.nan)
        return state, metrics

    monkeypatch.setattr(train, "update", diverging_update)
    with pytest.raises(train.NonFiniteLoss, match="the loss became nan"):
        train.train(config, run_dir, stream=open(os.devnull, "w"))
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(run_dir)]
    assert names == ["step-000000000300"]


def test_sigint_writes_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = str(tmp_path / "run")
    real_updates_due = train._updates_due

    def updates_due(run, step):
        if step == 250:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while training
        return real_updates_due(run, step)

    monkeypatch.setattr(train, "_updates_due", updates_due)
    code = train.main(["--preset", "cartpole", "--run-dir", run_dir, "--total-steps", "1000000",
                       "--checkpoint-every", "0", "--eval-every", "0", "--learning-starts", "200",
                       "--no-cpu-tuning"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (
        f"SIGINT at agent step 250: checkpoint {checkpoint.path_of(run_dir, 250)}; "
        f"continue with: python -m fdqn.train --resume {run_dir}"
    )
    config, q_fn, params, step = load_run(run_dir)
    assert step == 250
    scores = evaluate(q_fn, params, config, 2, 0.0, seed=0)
    assert len(scores) == 2


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="--num-envs: must be a positive integer") as e:
        Config(num_envs=0).validate()
    assert e.value.field == "num_envs"
    with pytest.raises(ConfigError, match="--preset: must be one of"):
        preset("nope")


def _saved_config(**changes):
    """The text of a saved cartpole config with some values changed."""
    with tempfile.TemporaryDirectory() as run_dir:
        save_config(preset("cartpole"), run_dir)
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.dumps({**json.load(f), **changes})


@pytest.mark.parametrize(
    "contents, message",
    [
        (None, "has no config.json: is it an fdqn run directory?"),
        (b"\xff\xfe", "is not a valid fdqn config: not JSON"),
        (b"{", "is not a valid fdqn config: not JSON"),
        (b"[1, 2]", "is not a valid fdqn config: expected a JSON object"),
        (json.dumps({"lr": 0.1}).encode(), "missing fields batch_size, buffer_size"),
        (_saved_config(bogus=1).encode(), "is not a valid fdqn config: unknown fields bogus"),
        (_saved_config(lr="fast").encode(), "config: lr must be a number, got 'fast'"),
        (_saved_config(seed=1.5).encode(), "config: seed must be an integer, got 1.5"),
        (_saved_config(double_q=1).encode(), "config: double_q must be true or false, got 1"),
        (_saved_config(hidden=5).encode(), "config: hidden must be a list of integers, got 5"),
        (_saved_config(env=None).encode(), "config: env must be a string, got None"),
        (_saved_config(lr=7.0).encode(), "--lr: must be in (0, 1], got 7.0"),
        (
            _saved_config(dtype_policy="float16").encode(),
            "--dtype-policy: must be one of float32, mixed_bfloat16, got 'float16'",
        ),
    ],
)
def test_load_config_rejects_what_is_not_a_saved_config(tmp_path, contents, message):
    if contents is not None:
        (tmp_path / "config.json").write_bytes(contents)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load_config(str(tmp_path))
    assert "\n" not in str(e.value)


def test_load_config_reads_back_what_was_saved_and_rejects_a_file_as_run_dir(tmp_path):
    (tmp_path / "config.json").write_text(_saved_config())
    assert load_config(str(tmp_path)) == preset("cartpole")
    with pytest.raises(ValueError, match="config.json is not a directory"):
        load_config(str(tmp_path / "config.json"))


def test_config_of_a_run_written_before_dtype_policy_loads_as_float32(tmp_path):
    saved = json.loads(_saved_config())
    del saved["dtype_policy"]  # as fdqn wrote config.json before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_config(str(tmp_path)).dtype_policy == "float32"
    assert set(FIELDS_ADDED_LATER) <= {f.name for f in dataclasses.fields(Config)}


def test_dtype_policy_reaches_the_network():
    from fdqn.config import make_env, make_network

    cfg = preset("cartpole").replace(dtype_policy="mixed_bfloat16", hidden=(8,)).validate()
    env = make_env(cfg)
    try:
        model = make_network(cfg, env)
    finally:
        env.close()
    assert [layer.dtype_policy.name for layer in model.layers] == [
        "mixed_bfloat16",
        "float32",
    ]
