"""Past one device: seeds sharded over a mesh and a data-parallel learner, on four forced
host devices (a subprocess: XLA takes its device count once), and the layout checks."""

import json
import os
import subprocess
import sys

import pytest

from fdqn import parallel
from fdqn.compiled import make_run
from fdqn.config import Config

HERE = os.path.dirname(__file__)


def _on_four_devices(*checks: str) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "four_devices.py"), *checks],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four():
    return _on_four_devices(
        "seeds_over_devices", "data_parallel_update", "data_parallel_run", "seeds_and_data"
    )


def test_seeds_sharded_over_four_devices_equal_the_unsharded_seeds(four):
    got = four["seeds_over_devices"]
    assert got["devices"] == 4 and got["shards"] == 4
    assert got["shard_shape"] == [1, 4, 16]  # a seed per device: its first layer's kernel
    # the same games (episode ends and returns bit for bit) and the same learning
    assert got["same_done"] and got["same_returns"]
    assert got["params_difference"] < 1e-6
    assert got["seeds_differ"]


def test_the_data_parallel_update_is_the_whole_batch_update(four):
    got = four["data_parallel_update"]
    assert got["steps"] == [5, 5]
    assert got["moved"] > 1e-2  # five Adam steps of 1e-2 moved the weights ...
    assert got["params_difference"] < 1e-6  # ... and a mean of four quarters is the whole mean
    assert got["loss"][0] == pytest.approx(got["loss"][1], rel=1e-6)


def test_a_data_parallel_run_splits_envs_and_replay_and_keeps_one_learner(four):
    got = four["data_parallel_run"]
    assert got["env_shape"] == [1, 4, 1, 4]  # 1 seed, 4 devices, 1 CartPole each
    assert got["ring_shape"] == [1, 4, 1, 100, 4]  # each device a quarter of the 400
    # 25 steps of 4 envs in all; an update every 2 agent steps from step 40: (100 - 40) // 2 + 1
    assert got["agent_steps"] == 100 and got["updates"] == got["learner_steps"] == 31
    assert got["episodes"] == got["done_sum"] and got["done_shape"] == [1, 25, 4]
    assert got["replicas"] == 4 and got["replicas_equal"]  # the parameters stayed one
    assert got["devices_differ"]  # each device its own games
    assert got["loss_finite"] and got["scores_shape"] == [1, 3]


def test_two_seeds_each_data_parallel_over_two_devices(four):
    got = four["seeds_and_data"]
    assert got["obs_shape"] == [2, 2, 2, 4]  # seeds, data devices, 2 envs each, CartPole's 4
    assert got["updates"] == [31, 31] and got["done_shape"] == [2, 25, 4]
    assert got["replicas_equal"] and got["seeds_differ"]


@pytest.mark.slow
def test_the_command_line_trains_data_parallel_and_resumes_on_the_same_devices():
    got = _on_four_devices("command_line_data_parallel_and_resume")
    got = got["command_line_data_parallel_and_resume"]
    assert got["codes"] == [0, 0] and got["agent_steps"] == [400, 800]
    assert got["layout_line"] and got["resumed"]


def test_an_impossible_layout_on_the_command_line_writes_nothing(tmp_path, capsys):
    from fdqn import train

    run_dir = tmp_path / "run"
    argv = ["--preset", "cartpole", "--devices", "3", "--num-seeds", "4", "--run-dir", str(run_dir)]
    assert train.main(argv) == 2  # the preset's one env per seed does not split over 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fdqn.train: error: --devices: --num-envs 1 does not split over 3 devices (--num-seeds 4 "
        "on 3 devices: each seed's envs and batches are split over 3): use a multiple of 3, "
        "or a multiple of 3 seeds"
    ]
    assert not run_dir.exists()


# -- layouts ---------------------------------------------------------------------------


def test_layouts_split_seeds_as_far_as_they_go_and_each_seed_over_the_rest():
    assert parallel.choose_layout(4, 8, 8, 32) == parallel.Layout(seeds=4, data=1)
    assert parallel.choose_layout(4, 1, 8, 32) == parallel.Layout(seeds=1, data=4)
    assert parallel.choose_layout(4, 2, 8, 32) == parallel.Layout(seeds=2, data=2)
    assert parallel.choose_layout(4, 6, 8, 32) == parallel.Layout(seeds=2, data=2)
    assert parallel.choose_layout(1, 1, 3, 5) == parallel.Layout(seeds=1, data=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            (4, 3, 6, 32),
            r"--num-envs 6 does not split over 4 devices \(--num-seeds 3 on 4 "
            r"devices: each seed's envs and batches are split over 4\): use a "
            r"multiple of 4, or a multiple of 4 seeds",
        ),
        ((4, 1, 6, 32), "--num-envs 6 does not split over 4 devices"),
        ((4, 2, 8, 31), "--batch-size 31 does not split over 2 devices"),
        ((0, 1, 8, 32), "--devices must be a positive integer, got 0"),
    ],
)
def test_impossible_layouts_are_one_line_errors(args, message):
    with pytest.raises(parallel.LayoutError, match=message) as e:
        parallel.choose_layout(*args)
    assert "\n" not in str(e.value)


def test_more_devices_than_visible_is_a_one_line_error():
    with pytest.raises(parallel.LayoutError, match=r"needs 2 devices; 1 are visible \(cpu\)"):
        parallel.make_mesh(parallel.Layout(1, 2))


def test_host_environments_run_on_one_device():
    mesh = parallel.make_mesh(parallel.Layout(1, 1))
    config = Config(env="breakout", num_envs=1, buffer_size=100, batch_size=8, total_steps=100)
    with pytest.raises(parallel.LayoutError, match="breakout steps on the host: use one device"):
        make_run(config, mesh=mesh)


# -- many hosts ------------------------------------------------------------------------


def test_cluster_from_flags_and_from_the_schedulers_variables():
    assert not parallel.cluster_from(environ={}).distributed
    got = parallel.cluster_from("10.0.0.1:1234", 2, 1, environ={})
    assert got == parallel.Cluster("10.0.0.1:1234", 2, 1) and got.distributed
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "FDQN_COORDINATOR": "node0:5000"}
    assert parallel.cluster_from(environ=slurm) == parallel.Cluster("node0:5000", 4, 3)
    # a flag wins over the environment
    assert parallel.cluster_from(process_id=2, environ=slurm).process_id == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_processes=2, process_id=0), "2 processes need --coordinator HOST:PORT"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
        (dict(coordinator="h:1", num_processes=2), r"--process-id must be in \[0, 2\)"),
        (dict(process_id=1), "--process-id 1 needs --num-processes above 1"),
        (dict(num_processes="two"), "--num-processes: not an integer: 'two'"),
    ],
)
def test_bad_cluster_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(parallel.LayoutError, match=message):
        parallel.cluster_from(environ={}, **kwargs)


# -- two processes on this machine (jax.distributed, CPU collectives) -------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(*args: str) -> list[dict]:
    """Runs two_processes.py as processes 0 and 1 of one run; the JSON lines of each."""
    port = str(_free_port())
    script = os.path.join(HERE, "two_processes.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(i), port, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in (0, 1)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outputs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return outputs


def test_two_processes_take_the_update_of_the_whole_batch():
    (first,), second = _two_processes("update")
    assert second == []  # process 0 reports
    assert first["processes"] == 2 and first["devices"] == 2
    assert first["moved"] > 1e-2 and first["difference"] < 1e-6


@pytest.mark.slow
def test_two_processes_train_and_resume_and_process_0_writes(tmp_path, capsys):
    from fdqn import train

    run_dir = str(tmp_path / "run")
    first, second = _two_processes("train", run_dir)
    # process 0 prints the run's summary, process 1 only its exit status
    assert first[0]["agent_steps"] == 400 and first[-1] == {"process": 0, "code": 0}
    assert second == [{"process": 1, "code": 0}]
    with open(os.path.join(run_dir, "layout.json")) as f:
        assert json.load(f) == {"processes": 2}
    first, second = _two_processes("resume", run_dir)
    assert first[0]["agent_steps"] == 600 and second == [{"process": 1, "code": 0}]
    # one process cannot take up what two wrote: refused before anything changes
    before = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert train.main(["--resume", run_dir, "--total-steps", "800"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"fdqn.train: error: {run_dir} was trained by 2 process(es); this run has 1: "
        f"resume it with --num-processes 2"
    ]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == before


def test_a_coordinator_nobody_runs_is_a_one_line_error_within_the_timeout(tmp_path):
    import time

    run_dir = tmp_path / "run"
    port = _free_port()
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "fdqn.train", "--preset", "cartpole", "--num-envs", "2",
         "--run-dir", str(run_dir),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
         "--coordinator-timeout", "3", "--no-cpu-tuning"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and time.monotonic() - start < 60
    assert out.stderr.strip().splitlines()[-1] == (
        f"fdqn.train: error: process 1 of 2 could not join the run's processes at "
        f"127.0.0.1:{port} within 3 s (is process 0 running, and every process started with "
        f"--num-processes 2?)"
    )
    assert not run_dir.exists()


def test_a_layout_no_process_can_run_stops_each_before_it_joins(tmp_path, capsys):
    from fdqn import train

    run_dir = tmp_path / "run"
    # one seed on two processes' devices is data-parallel: 3 envs do not split over 2
    argv = ["--preset", "cartpole", "--num-envs", "3", "--run-dir", str(run_dir), "--coordinator",
            "127.0.0.1:1", "--num-processes", "2", "--process-id", "1"]  # fmt: skip
    assert train.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fdqn.train: error: --num-envs 3 does not split over 2 devices (--num-seeds 1 on 2 "
        "devices: each seed's envs and batches are split over 2): use a multiple of 2, or a "
        "multiple of 2 seeds"
    ]
    assert not run_dir.exists()
