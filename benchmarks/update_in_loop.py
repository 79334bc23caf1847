"""One Nature-CNN update alone against the same update inside an XLA loop, on this backend.

    python benchmarks/update_in_loop.py [--rounds 5] [--no-cpu-tuning]

The compiled run takes its updates inside ``lax.scan`` (and a
``lax.fori_loop`` of the updates due), with the parameters carried from one
iteration to the next. This measures what that costs per update, for the
whole ``fdqn.update`` (Adam, global-norm clipping, batch 32 of Atari stacks)
and for a plain gradient step, each timed alone under ``jit`` and as one of
4 iterations of a ``fori_loop`` that carries the parameters; the two forms
alternate within each round, and medians are printed. Each is measured
with the stock Keras network and with its :func:`fdqn.cpu.cpu_model` copy
(the layers ``python -m fdqn.train`` uses on a CPU), whose gradient
convolutions are in the form XLA:CPU runs fast in loop bodies too.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-cpu-tuning", action="store_true")
    args = parser.parse_args()
    from fdqn import cpu

    tuning = None if args.no_cpu_tuning else cpu.tune()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fdqn import networks
    from fdqn.learner import Batch, create_train_state, make_optimizer, update

    print(f"jax {jax.__version__}, devices {jax.devices()}; {tuning}")
    stock = networks.nature_cnn(4, seed=0)
    models = {"stock Conv2D": stock, "cpu_model": cpu.cpu_model(stock)}
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, 32, 4, 84, 84), dtype=np.uint8)
    batch = Batch(
        jnp.asarray(frames[0]), jnp.asarray(rng.integers(0, 4, 32), jnp.int32),
        jnp.asarray(rng.normal(size=32), jnp.float32), jnp.asarray(frames[1]),
        jnp.zeros(32, bool),
    )  # fmt: skip

    def sgd_of(q_fn):
        def sgd(params):
            grads = jax.grad(lambda p: q_fn(p, batch.obs).sum())(params)
            return jax.tree.map(lambda a, g: a - 1e-9 * g, params, grads)

        return sgd

    def dqn(s):
        return update(s, batch)[0]

    def in_loop(step):
        return jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, x: step(x), x))

    cases = {}
    for layers, model in models.items():
        state = create_train_state(model, make_optimizer("adam", 1e-4), jax.random.key(0))
        cases[f"fdqn.update, {layers}"] = (dqn, state)
        cases[f"gradient step, {layers}"] = (sgd_of(state.q_fn), state.params)
    for name, (step, x) in cases.items():
        forms = {"alone": (jax.jit(step), 1), "in a fori_loop": (in_loop(step), 4)}
        times = {form: [] for form in forms}
        for f, _ in forms.values():
            jax.block_until_ready(f(x))
        for _ in range(args.rounds):
            for form, (f, per) in forms.items():
                start = time.perf_counter()
                jax.block_until_ready(f(x))
                times[form].append((time.perf_counter() - start) / per * 1e3)
        alone, looped = (statistics.median(times[f]) for f in forms)
        print(f"{name:28s}: alone {alone:7.1f} ms, in a fori_loop {looped:7.1f} ms per update "
              f"(x{looped / alone:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
