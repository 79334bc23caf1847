"""Strided convolutions with and without fdqn's space-to-depth input gradient, side by side.

For the Nature CNN (batch 32, Adam) and the notebook's network (batch 64,
RMSProp, raw pixels): one ``fdqn.update`` and one ``fdqn.select_actions`` call
for 8 observations, with ``space_to_depth=False`` (``keras.layers.Conv2D``) and
``True`` (``fdqn.cpu.CpuConv2D``, same weights), all four in one process,
alternating (A B C D A B ...) over rounds; medians. Then, for each strided
convolution of the two networks whose input gradient an update needs, the time
of that gradient alone: XLA's (``jax.lax.conv_general_dilated``) against
``fdqn.cpu.conv2d``'s, alternating; and for the two first layers,
the forward pass alone, XLA's strided convolution against the space-to-depth
form (``conv2d(..., forward="space_to_depth")``, which the notebook
network's first layer uses). All run under whatever XLA
flags the process has (fdqn's CPU defaults unless XLA_FLAGS is set). The last
line of output is one JSON object.

    python benchmarks/space_to_depth.py [--rounds 8]
"""

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import fdqn
import fdqn.cpu

fdqn.cpu.tune()  # the XLA flag and malloc settings fdqn.train applies on a CPU


def _layers(model, s2d):
    return fdqn.cpu.cpu_model(model) if s2d else model


SETUPS = {
    "nature": (lambda s2d: _layers(fdqn.nature_cnn(4, seed=0), s2d), 32, ("adam", 1e-4)),
    "notebook": (
        lambda s2d: _layers(fdqn.notebook_cnn(4, scale_obs=False, seed=0), s2d),
        64,
        ("rmsprop", 2.5e-4),
    ),
}


def random_batch(rng, size):
    return fdqn.Batch(
        obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        action=rng.integers(0, 4, size),
        reward=rng.normal(size=size).astype(np.float32),
        next_obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        terminated=rng.random(size) < 0.1,
    )


# (network, batch, input height/width, channels, filters, kernel, stride) of
# the strided convolutions that are not a network's first layer
LAYERS = [
    ("nature/conv2", 32, 20, 32, 64, 4, 2),
    ("notebook/conv2", 64, 40, 16, 32, 5, 2),
    ("notebook/conv3", 64, 18, 32, 32, 5, 2),
]


# the first layers, whose forward pass can take the space-to-depth form
FIRST_LAYERS = [
    ("nature/conv1", 32, 84, 4, 32, 8, 4),
    ("notebook/conv1", 64, 84, 4, 16, 5, 2),
]


def layer_arrays(rng, batch, size, channels, filters, kernel) -> tuple[jax.Array, jax.Array]:
    """A random input and kernel for a convolution layer."""
    x = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, channels, filters)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


def forward_ms(rounds: int) -> dict:
    rng = np.random.default_rng(2)
    fns, args = {}, {}
    for name, batch, size, channels, filters, kernel, stride in FIRST_LAYERS:
        x, w = layer_arrays(rng, batch, size, channels, filters, kernel)
        for forward in ("direct", "space_to_depth"):
            fn = functools.partial(fdqn.cpu.conv2d, strides=(stride, stride), forward=forward)
            fns[f"{name}/{forward}"], args[f"{name}/{forward}"] = jax.jit(fn), (x, w)
    return time_alternating(fns, args, rounds)


def time_alternating(fns: dict, args: dict, rounds: int) -> dict:
    """Median ms per call of each jitted function, A B C A B C ... over rounds."""
    for key, fn in fns.items():
        jax.block_until_ready(fn(*args[key]))  # compile
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            for _ in range(10):
                out = fn(*args[key])
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - start) / 10 * 1000)
    return {key: statistics.median(v) for key, v in times.items()}


def input_gradient_ms(rounds: int) -> dict:
    rng = np.random.default_rng(1)
    fns, args = {}, {}
    for name, batch, size, channels, filters, kernel, stride in LAYERS:
        x, w = layer_arrays(rng, batch, size, channels, filters, kernel)
        out = (size - kernel) // stride + 1
        g = jnp.asarray(rng.normal(size=(batch, out, out, filters)).astype(np.float32))
        strides = (stride, stride)

        def xla(x, w, g, strides=strides):
            conv = functools.partial(
                jax.lax.conv_general_dilated,
                window_strides=strides,
                padding="VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            return jax.vjp(lambda v: conv(v, w), x)[1](g)[0]

        def ours(x, w, g, strides=strides):
            return jax.vjp(lambda v: fdqn.cpu.conv2d(v, w, strides), x)[1](g)[0]

        for impl, fn in (("xla", xla), ("conv2d", ours)):
            fns[f"{name}/{impl}"], args[f"{name}/{impl}"] = jax.jit(fn), (x, w, g)
    return time_alternating(fns, args, rounds)


def print_pairs(times: dict, layers: list, what: str, a: tuple, b: tuple) -> None:
    """One line per layer: the times of implementations ``a`` and ``b`` (key, label) and ratio."""
    for name, *_ in layers:
        ta, tb = times[f"{name}/{a[0]}"], times[f"{name}/{b[0]}"]
        print(
            f"{name:>24}: {what} {ta:.2f} ms ({a[1]}) against {tb:.2f} ms ({b[1]}), x{ta / tb:.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    rng = np.random.default_rng(0)
    obs, key = random_batch(rng, 8).obs, jax.random.key(0)
    states, batches = {}, {}
    for network, (build, batch_size, (optimizer, lr)) in SETUPS.items():
        batch = random_batch(rng, batch_size)
        for s2d in (False, True):
            name = f"{network}/{'space_to_depth' if s2d else 'conv2d'}"
            state = fdqn.create_train_state(build(s2d), fdqn.make_optimizer(optimizer, lr), key)
            for _ in range(3):  # compile and warm up
                state, _ = fdqn.update(state, batch)
            np.asarray(fdqn.select_actions(state.q_fn, state.params, key, obs, 0.0))
            states[name], batches[name] = state, batch
    update_ms = {name: [] for name in states}
    act_ms = {name: [] for name in states}
    for _ in range(args.rounds):
        for name in states:
            start = time.perf_counter()
            for _ in range(8):
                states[name], metrics = fdqn.update(states[name], batches[name])
            jax.block_until_ready((states[name], metrics))
            update_ms[name].append((time.perf_counter() - start) / 8 * 1000)
            start = time.perf_counter()
            for _ in range(40):
                s = states[name]
                np.asarray(fdqn.select_actions(s.q_fn, s.params, key, obs, 0.0))
            act_ms[name].append((time.perf_counter() - start) / 40 * 1000)
    result = {
        name: {
            "update_ms": statistics.median(update_ms[name]),
            "act8_ms": statistics.median(act_ms[name]),
        }
        for name in states
    }
    for name, r in result.items():
        print(f"{name:>24}: update {r['update_ms']:.1f} ms, actions (8 obs) {r['act8_ms']:.2f} ms")
    grads = input_gradient_ms(args.rounds)
    print_pairs(grads, LAYERS, "input gradient", ("xla", "XLA"), ("conv2d", "conv2d"))
    result["input_gradient_ms"] = grads
    forwards = forward_ms(args.rounds)
    print_pairs(
        forwards,
        FIRST_LAYERS,
        "forward",
        ("direct", "XLA's strided convolution"),
        ("space_to_depth", "space-to-depth form"),
    )
    result["forward_ms"] = forwards
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
