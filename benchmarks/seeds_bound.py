"""What many seeds in one program can gain on this CPU: the CartPole update, vmapped over seeds.

    python benchmarks/seeds_bound.py [--rounds 5] [--seeds 1,4,16]

The update of ``compiled_run.py``'s configuration (batch 128, MLP 4-120-84-2,
Adam, squared loss), ``--seeds`` copies ``vmap``-ped, 100 of them in a
``fori_loop`` under one ``jit`` as in the compiled run. Prints the time per
update of all seeds, per seed, and the arithmetic rate: an update is the
online network's forward and backward pass and the target network's forward
pass, about 4 forward passes of 2 * 128 * (4*120 + 120*84 + 84*2) FLOPs.
Rounds alternate over the seed counts; medians.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fdqn import networks  # noqa: E402
from fdqn.learner import Batch, create_train_state, make_optimizer, update  # noqa: E402

LAYERS = (4, 120, 84, 2)
BATCH, UPDATES = 128, 100
FLOPS = 4 * 2 * BATCH * sum(a * b for a, b in zip(LAYERS, LAYERS[1:]))


def program(seeds: int):
    model = networks.mlp(2, 4, (120, 84), seed=0)
    optimizer = make_optimizer("adam", 2.5e-4, clip="none")
    state = create_train_state(model, optimizer, jax.random.key(0))
    state = jax.tree.map(lambda x: jnp.stack([x] * seeds), state)
    rng = np.random.default_rng(0)
    batch = Batch(
        obs=jnp.asarray(rng.normal(size=(seeds, BATCH, 4)), jnp.float32),
        action=jnp.asarray(rng.integers(0, 2, (seeds, BATCH)), jnp.int32),
        reward=jnp.asarray(rng.normal(size=(seeds, BATCH)), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(seeds, BATCH, 4)), jnp.float32),
        terminated=jnp.zeros((seeds, BATCH), jnp.float32),
    )

    @jax.jit
    def updates(state):
        def body(_, state):
            return jax.vmap(lambda s, b: update(s, b, huber_delta=None)[0])(state, batch)

        return jax.lax.fori_loop(0, UPDATES, body, state)

    jax.block_until_ready(updates(state))  # compiles

    def timed() -> float:
        start = time.perf_counter()
        jax.block_until_ready(updates(state))
        return (time.perf_counter() - start) / UPDATES

    return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", default="1,4,16")
    args = parser.parse_args()
    counts = [int(s) for s in args.seeds.split(",")]
    programs = {s: program(s) for s in counts}
    times = {s: [] for s in counts}
    for r in range(args.rounds):
        for s in counts[r % len(counts) :] + counts[: r % len(counts)]:
            times[s].append(programs[s]())
    print(f"{os.cpu_count()} cores; one update: {FLOPS / 1e6:.1f} MFLOP; {args.rounds} rounds")
    base = statistics.median(times[counts[0]])
    for s in counts:
        t = statistics.median(times[s])
        print(
            f"  S={s:3d}: {t * 1e6:8.0f} us per update of all seeds, {t * 1e6 / s:6.1f} us per "
            f"seed, {s * FLOPS / t / 1e9:6.1f} GFLOP/s; seed-updates/s x{s * base / t:.2f} of "
            f"S={counts[0]}"
        )


if __name__ == "__main__":
    main()
