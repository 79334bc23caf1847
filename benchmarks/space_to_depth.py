"""The Nature CNN with and without space-to-depth convolutions, side by side in one process.

One ``fdqn.update`` (batch 32, Adam) and one ``fdqn.select_actions`` call for 8
observations, for ``nature_cnn(space_to_depth=False)`` and ``True`` with the
same weights, alternating (A B A B ...) over rounds; medians. Both run under
whatever XLA flags the process has (fdqn's CPU defaults unless XLA_FLAGS is set).
The last line of output is one JSON object.

    python benchmarks/space_to_depth.py [--rounds 6]
"""

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np

import fdqn


def random_batch(rng, size):
    return fdqn.Batch(
        obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        action=rng.integers(0, 4, size),
        reward=rng.normal(size=size).astype(np.float32),
        next_obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        terminated=rng.random(size) < 0.1,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    batch, obs = random_batch(rng, 32), random_batch(rng, 8).obs
    key = jax.random.key(0)
    states = {}
    for name, s2d in (("conv2d", False), ("space_to_depth", True)):
        fdqn.seed_initializers(0)
        model = fdqn.nature_cnn(4, space_to_depth=s2d)
        states[name] = fdqn.create_train_state(model, fdqn.make_optimizer("adam", 1e-4), key)
        for _ in range(3):  # compile and warm up
            states[name], _ = fdqn.update(states[name], batch)
        np.asarray(fdqn.select_actions(states[name].q_fn, states[name].params, key, obs, 0.0))
    update_ms = {name: [] for name in states}
    act_ms = {name: [] for name in states}
    for _ in range(args.rounds):
        for name in states:
            start = time.perf_counter()
            for _ in range(10):
                states[name], metrics = fdqn.update(states[name], batch)
            jax.block_until_ready((states[name], metrics))
            update_ms[name].append((time.perf_counter() - start) / 10 * 1000)
            start = time.perf_counter()
            for _ in range(50):
                s = states[name]
                np.asarray(fdqn.select_actions(s.q_fn, s.params, key, obs, 0.0))
            act_ms[name].append((time.perf_counter() - start) / 50 * 1000)
    result = {
        name: {
            "update_ms": statistics.median(update_ms[name]),
            "act8_ms": statistics.median(act_ms[name]),
        }
        for name in states
    }
    for name, r in result.items():
        print(f"{name:>15}: update {r['update_ms']:.1f} ms, actions (8 obs) {r['act8_ms']:.2f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
