"""Checks of fdqn.parallel on four forced host devices, run in a subprocess by test_parallel.py.

XLA takes its device count once, when JAX starts: the flag is set before JAX
is imported, in a process of its own. Prints one JSON object of figures the
tests compare.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fdqn import networks, parallel  # noqa: E402
from fdqn.compiled import make_run  # noqa: E402
from fdqn.config import Config  # noqa: E402
from fdqn.learner import Batch, create_train_state, make_optimizer, update  # noqa: E402

TINY = Config(
    env="CartPole-v1", network="mlp", hidden=(16, 16), num_envs=4, total_steps=2_000, lr=1e-3,
    batch_size=16, buffer_size=400, learning_starts=40, train_every=2, target_update=30,
    clip="global", epsilon_end=0.05, exploration_fraction=0.5, eval_every=0, checkpoint_every=0,
)  # fmt: skip


def largest_difference(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def seeds_over_devices() -> dict:
    seeds = [3, 5, 7, 9]
    plain = make_run(TINY)
    alone, alone_metrics = plain.run(plain.init(seeds), 25)
    sharded_run = make_run(TINY, mesh=parallel.make_mesh(parallel.Layout(4, 1)))
    state = sharded_run.init(seeds)
    sharded, metrics = sharded_run.run(state, 25)
    params = sharded.learner.params[0]
    return {
        "devices": len(jax.devices()),
        "shards": len(params.addressable_shards),
        "shard_shape": list(params.addressable_shards[0].data.shape),
        "params_difference": largest_difference(alone.learner.params, sharded.learner.params),
        "same_done": bool(np.array_equal(alone_metrics.done, metrics.done)),
        "same_returns": bool(np.array_equal(alone_metrics.episode_return, metrics.episode_return)),
        "seeds_differ": bool(not np.allclose(params[0], params[1])),
    }


def data_parallel_update() -> dict:
    model = networks.mlp(2, 4, (16, 16), seed=0)
    optimizer = make_optimizer("adam", 1e-2, clip="global", max_grad_norm=1.0)
    rng = np.random.default_rng(0)
    mesh = parallel.make_mesh(parallel.Layout(1, 4))
    step = parallel.data_parallel_update(mesh, gamma=0.9)
    one = create_train_state(model, optimizer, jax.random.key(0))
    four = create_train_state(model, optimizer, jax.random.key(0))
    for _ in range(5):  # the same global batch of 32 on one device and split over four
        batch = Batch(
            obs=jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
            action=jnp.asarray(rng.integers(0, 2, 32), jnp.int32),
            reward=jnp.asarray(rng.normal(size=32), jnp.float32),
            next_obs=jnp.asarray(rng.normal(size=(32, 4)), jnp.float32),
            terminated=jnp.asarray(rng.integers(0, 2, 32), jnp.float32),
        )
        one, one_metrics = update(one, batch, gamma=0.9)
        four, four_metrics = step(four, batch)
    start = create_train_state(model, optimizer, jax.random.key(0))
    return {
        "params_difference": largest_difference(one.params, four.params),
        "moved": largest_difference(one.params, start.params),
        "loss": [float(one_metrics["loss"]), float(four_metrics["loss"])],
        "steps": [int(one.step), int(four.step)],
    }


def data_parallel_run() -> dict:
    run = make_run(TINY, mesh=parallel.make_mesh(parallel.Layout(1, 4)))
    state = run.init([3])
    state, metrics = run.run(state, 25)
    params = state.learner.params[0]
    copies = [np.asarray(s.data) for s in params.addressable_shards]  # one per device
    keys = jax.random.split(jax.random.key(0), 1)
    scores = np.asarray(run.evaluate(state.learner.params, keys, 3, 0.0))
    ring = state.replay
    return {
        "env_shape": list(state.obs.shape),
        "ring_shape": list(ring.obs.shape),
        "agent_steps": int(state.counters.agent_steps[0]),
        "updates": int(state.counters.updates[0]),
        "learner_steps": int(state.learner.step[0]),
        "episodes": int(state.counters.episodes[0]),
        "done_sum": int(np.asarray(metrics.done).sum()),
        "done_shape": list(metrics.done.shape),
        "replicas_equal": all(np.array_equal(copies[0], c) for c in copies[1:]),
        "replicas": len(copies),
        "devices_differ": bool(not np.array_equal(state.obs[0, 0], state.obs[0, 1])),
        "loss_finite": bool(np.isfinite(np.asarray(state.learner_metrics["loss"])).all()),
        "scores_shape": list(scores.shape),
    }


def seeds_and_data() -> dict:
    # 2 seeds x 2 data devices: each seed data-parallel over its own pair of devices
    run = make_run(TINY, mesh=parallel.make_mesh(parallel.Layout(2, 2)))
    state, metrics = run.run(run.init([3, 5]), 25)
    params = state.learner.params[0]
    by_device = {s.device.id: np.asarray(s.data) for s in params.addressable_shards}
    grid = run.mesh.devices  # (seeds, data) of devices
    pairs = [[by_device[d.id] for d in row] for row in grid]
    return {
        "obs_shape": list(state.obs.shape),
        "updates": np.asarray(state.counters.updates).tolist(),
        "replicas_equal": all(np.array_equal(a, b) for a, b in pairs),
        "seeds_differ": bool(not np.allclose(pairs[0][0], pairs[1][0])),
        "done_shape": list(metrics.done.shape),
    }


def command_line_data_parallel_and_resume() -> dict:
    import contextlib
    import io
    import tempfile

    from fdqn import train

    run_dir = os.path.join(tempfile.mkdtemp(), "run")
    args = ["--preset", "cartpole", "--devices", "4", "--num-envs", "4", "--hidden", "16,16",
            "--buffer-size", "400", "--learning-starts", "100", "--eval-every", "0",
            "--eval-episodes", "2", "--log-every", "200", "--checkpoint-every", "200",
            "--no-cpu-tuning"]  # fmt: skip
    codes, outputs, errors = [], [], []
    for argv in (
        [*args, "--total-steps", "400", "--run-dir", run_dir],
        ["--resume", run_dir, "--total-steps", "800", "--no-cpu-tuning"],
    ):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            codes.append(train.main(argv))
        outputs.append(json.loads(out.getvalue().strip().splitlines()[-1]))
        errors.append(err.getvalue())
    return {
        "codes": codes,
        "agent_steps": [o["agent_steps"] for o in outputs],
        "layout_line": "1 (seeds) x 4 (data) devices (1 process(es)): cpu" in errors[0],
        "resumed": "resumed from" in errors[1],
    }


CHECKS = {
    f.__name__: f
    for f in (
        seeds_over_devices, data_parallel_update, data_parallel_run, seeds_and_data,
        command_line_data_parallel_and_resume,
    )
}  # fmt: skip

if __name__ == "__main__":
    names = sys.argv[1:] or list(CHECKS)
    print(json.dumps({name: CHECKS[name]() for name in names}))
