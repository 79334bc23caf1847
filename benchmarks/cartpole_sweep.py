"""CartPole-v1 configurations, 10 seeds each in one compiled program, scored by the final policy.

    python benchmarks/cartpole_sweep.py '{"batch_size": 256}' ['{"gamma": 0.995}' ...]

Each argument is a JSON object of config fields over the ``cartpole`` preset;
``"_lr_decay_to": F`` adds a linear learning-rate decay to ``F`` times ``lr``
at the last update. Each runs seeds 1-10 for the preset's 50,000 agent
steps and evaluates every seed's greedy policy (20 games) at 25,000, 37,500
and 50,000 steps. One line per configuration: how many seeds' final
evaluation reaches 475, then every seed's final and 37,500-step means.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fdqn.compiled import make_run  # noqa: E402
from fdqn.config import PRESETS, Config  # noqa: E402
from fdqn.learner import make_optimizer  # noqa: E402

SEEDS = list(range(1, 11))
MARKS = (25_000, 37_500, 50_000)


def sweep_one(overrides: dict) -> str:
    overrides = dict(overrides)
    decay = overrides.pop("_lr_decay_to", None)
    if "hidden" in overrides:
        overrides["hidden"] = tuple(overrides["hidden"])
    config = Config(**{**PRESETS["cartpole"], **overrides}).validate()
    run = make_run(config)
    if decay is not None:
        import optax

        updates = (config.total_steps - config.learning_starts) // config.train_every
        schedule = optax.linear_schedule(config.lr, config.lr * decay, updates)
        optimizer = make_optimizer(
            config.optimizer, schedule, clip=config.clip, max_grad_norm=config.max_grad_norm
        )
        run = dataclasses.replace(run, optimizer=optimizer)
    state = run.init(SEEDS)
    keys = jax.vmap(lambda s: jax.random.key(s + 1000))(jnp.asarray(SEEDS))
    start, done, evals = time.perf_counter(), 0, []
    for mark in MARKS:
        state, _ = run.run(state, run.steps_for(mark) - run.steps_for(done))
        done = mark
        scores = run.evaluate(state.learner.params, keys, 20, 0.0)
        evals.append(np.asarray(scores).mean(axis=1))
    final = evals[-1]
    return (
        f"{json.dumps(overrides | ({'_lr_decay_to': decay} if decay is not None else {}))} "
        f"{time.perf_counter() - start:.0f}s final>=475: {int((final >= 475).sum())} "
        f"final: {' '.join(f'{x:.0f}' for x in final)} | "
        f"37.5k: {' '.join(f'{x:.0f}' for x in evals[1])}"
    )


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(sweep_one(json.loads(arg)), flush=True)


if __name__ == "__main__":
    main()
