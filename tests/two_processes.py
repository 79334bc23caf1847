"""One of two processes joined by ``jax.distributed`` on 127.0.0.1 (CPU collectives), for
test_parallel.py: ``python two_processes.py PROCESS_ID PORT update|train|resume [RUN_DIR]``.

``update``: the data-parallel learner with a device in each process against
one process's update of the same global batch; process 0 prints the figures
as JSON. ``train``: ``python -m fdqn.train`` of CartPole, data-parallel over
the two processes, into RUN_DIR; ``resume``: its resume to 600 agent steps;
each process prints its exit status.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
process_id, port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
coordinator = f"127.0.0.1:{port}"


def update_check() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fdqn import networks, parallel
    from fdqn.learner import Batch, create_train_state, make_optimizer, update

    parallel.initialize(parallel.Cluster(coordinator, 2, process_id), timeout_s=60)
    mesh = parallel.make_mesh(parallel.Layout(1, 2), parallel.devices_per_process(1))
    model = networks.mlp(2, 4, (16, 16), seed=0)
    optimizer = make_optimizer("adam", 1e-2, clip="global", max_grad_norm=1.0)
    step = parallel.data_parallel_update(mesh, gamma=0.9)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(parallel.DATA))
    alone = create_train_state(model, optimizer, jax.random.key(0))
    together = parallel.put(create_train_state(model, optimizer, jax.random.key(0)), replicated)
    rng = np.random.default_rng(0)  # the same batches in both processes
    for _ in range(5):
        batch = Batch(
            obs=rng.normal(size=(32, 4)).astype(np.float32),
            action=rng.integers(0, 2, 32).astype(np.int32),
            reward=rng.normal(size=32).astype(np.float32),
            next_obs=rng.normal(size=(32, 4)).astype(np.float32),
            terminated=rng.integers(0, 2, 32).astype(np.float32),
        )
        alone, _ = update(alone, jax.tree.map(jnp.asarray, batch), gamma=0.9)
        together, _ = step(together, parallel.put(batch, split))
    mine = [np.asarray(p.addressable_shards[0].data) for p in together.params]
    difference = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(mine, alone.params))
    start = create_train_state(model, optimizer, jax.random.key(0))
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(alone.params, start.params)
    )
    if process_id == 0:
        print(json.dumps({"processes": jax.process_count(), "devices": len(jax.devices()),
                          "difference": difference, "moved": moved}))  # fmt: skip


def train_check(run_dir: str, resume: bool) -> None:
    from fdqn import train

    cluster = ["--no-cpu-tuning", "--coordinator", coordinator, "--num-processes", "2",
               "--process-id", str(process_id)]  # fmt: skip
    if resume:
        argv = ["--resume", run_dir, "--total-steps", "600", *cluster]
    else:
        argv = [
            "--preset", "cartpole", "--num-envs", "2", "--hidden", "16,16",
            "--buffer-size", "400", "--learning-starts", "100", "--eval-every", "0",
            "--eval-episodes", "2", "--log-every", "200", "--checkpoint-every", "200",
            "--total-steps", "400", "--run-dir", run_dir, *cluster,
        ]  # fmt: skip
    code = train.main(argv)
    print(json.dumps({"process": process_id, "code": code}))


if mode == "update":
    update_check()
else:
    train_check(sys.argv[4], resume=mode == "resume")
