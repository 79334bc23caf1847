"""optax's global-norm clipping against a hand-written one, in whole ``fdqn.update`` calls.

The hand-written form (what fdqn used until 2026-12-02) takes each gradient's
sum of squares as one dot product, which XLA:CPU computes without writing the
squares out; optax's ``clip_by_global_norm`` squares and sums. fdqn keeps a
hand-written transformation only if it saves at least 5% of the update. Both
run in one process under ``fdqn.cpu.tune()``, Nature CNN, batch 32, Adam,
alternating blocks of updates; medians of the per-block means and of the
per-round ratios are printed, then one JSON object.

    python benchmarks/global_norm_clip.py [--rounds 9] [--updates 40]
"""

import argparse
import json
import statistics
import time

import fdqn
import fdqn.cpu

fdqn.cpu.tune()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


def dot_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    def norm(tree):
        return jnp.sqrt(sum(jnp.vdot(x.ravel(), x.ravel()) for x in jax.tree.leaves(tree)))

    def update_fn(updates, state, params=None):
        scale = jnp.minimum(1.0, max_norm / norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--updates", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    batch = fdqn.Batch(
        obs=rng.integers(0, 256, (32, 4, 84, 84), dtype=np.uint8),
        action=rng.integers(0, 4, 32),
        reward=rng.normal(size=32).astype(np.float32),
        next_obs=rng.integers(0, 256, (32, 4, 84, 84), dtype=np.uint8),
        terminated=rng.random(32) < 0.1,
    )
    model = fdqn.cpu.cpu_model(fdqn.nature_cnn(4, seed=0))
    clips = {"optax": optax.clip_by_global_norm(10.0), "dot": dot_clip_by_global_norm(10.0)}
    states = {
        name: fdqn.create_train_state(
            model, optax.chain(clip, optax.adam(1e-4, eps=1e-8)), jax.random.key(0)
        )
        for name, clip in clips.items()
    }
    for name in states:  # compile and warm up
        for _ in range(5):
            states[name], m = fdqn.update(states[name], batch)
        float(m["loss"])
    times = {name: [] for name in states}
    for r in range(args.rounds):
        for name in list(states)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            for _ in range(args.updates):
                states[name], m = fdqn.update(states[name], batch)
            float(m["loss"])
            times[name].append((time.perf_counter() - start) / args.updates * 1e3)
    ratios = [d / o for d, o in zip(times["dot"], times["optax"])]
    summary = {
        "optax_ms": statistics.median(times["optax"]),
        "dot_ms": statistics.median(times["dot"]),
        "dot_over_optax_median": statistics.median(ratios),
        "dot_over_optax_range": [min(ratios), max(ratios)],
        "rounds": args.rounds,
        "updates": args.updates,
    }
    print(
        f"Nature CNN update, batch 32, Adam: optax {summary['optax_ms']:.2f} ms, "
        f"dot-product {summary['dot_ms']:.2f} ms; dot/optax per round median "
        f"x{summary['dot_over_optax_median']:.3f} ({min(ratios):.3f} to {max(ratios):.3f})"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
