"""Each layer of the two networks, pass by pass: fdqn (XLA:CPU) against TF and PyTorch.

Where a learner update's time goes, kernel by kernel. For every convolution
and the large dense layer of the Nature CNN (batch 32) and of the notebook's
network (batch 64), three passes are timed alone, without bias or
activation:

- ``forward``: the layer's output (an update computes it twice, for the
  online and the target network);
- ``kernel_grad``: the gradient with respect to the kernel, from the input and
  the output's cotangent;
- ``input_grad``: the gradient with respect to the input (not for a first
  layer, whose input is data).

Implementations, each in its own worker process:

- ``fdqn``: the forms fdqn's networks use, jitted: :func:`fdqn.cpu.conv2d`
  (space-to-depth forward pass for the notebook's first layer, space-to-depth
  input gradients) and XLA's kernel gradients and stride-1 convolutions,
  under fdqn's XLA flags;
- ``tf_function``: ``tf.nn.conv2d`` and the ``Conv2DBackpropFilter`` /
  ``Conv2DBackpropInput`` kernels its gradient uses, inside ``tf.function``,
  channels last, with oneDNN's kernels on as in benchmarks/tf_notebook.py;
- ``torch``: ``torch.nn.functional.conv2d`` and ``torch.nn.grad``, channels
  first, when PyTorch is installed.

The workers take turns pass by pass, the order rotating each round; each
times ``--reps`` calls per block and the table shows medians over rounds.
The per-network sums weight the forward pass twice, as an update runs it;
they leave out everything that is not one of these kernels (bias adds,
activations, layout changes, the loss and the optimizer). The last line of
output is one JSON object.

    python benchmarks/layers.py [--rounds 7] [--reps 10] [--out FILE]
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the worker processes and the machine description)

# name: (batch, input height and width, input channels, outputs, kernel size, stride);
# a kernel size of 0 is a dense layer on a flat input of that many features
LAYERS = {
    "notebook/conv1": (64, 84, 4, 16, 5, 2),
    "notebook/conv2": (64, 40, 16, 32, 5, 2),
    "notebook/conv3": (64, 18, 32, 32, 5, 2),
    "notebook/q_values": (64, 1568, 1568, 4, 0, 1),
    "nature/conv1": (32, 84, 4, 32, 8, 4),
    "nature/conv2": (32, 20, 32, 64, 4, 2),
    "nature/conv3": (32, 9, 64, 64, 3, 1),
    "nature/fc": (32, 3136, 3136, 512, 0, 1),
}
PASSES = ("forward", "kernel_grad", "input_grad")
IMPLS = ("fdqn", "tf_function") + (("torch",) if importlib.util.find_spec("torch") else ())
FIRST_LAYERS = ("notebook/conv1", "nature/conv1")


def ops() -> list[str]:
    """Every ``layer:pass`` timed, in table order."""
    return [
        f"{layer}:{p}"
        for layer in LAYERS
        for p in PASSES
        if not (p == "input_grad" and layer in FIRST_LAYERS)
    ]


def _arrays(layer: str, channels_last: bool):
    """Input, kernel and output cotangent of a layer, float32, the same in every worker."""
    import numpy as np

    batch, size, cin, cout, k, stride = LAYERS[layer]
    rng = np.random.default_rng(0)
    if k == 0:
        x = rng.standard_normal((batch, cin), np.float32)
        w = rng.standard_normal((cin, cout), np.float32) * 0.02
        g = rng.standard_normal((batch, cout), np.float32)
        return x, w, g
    out = (size - k) // stride + 1
    x = rng.standard_normal((batch, size, size, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32) * 0.05  # HWIO
    g = rng.standard_normal((batch, out, out, cout), np.float32)
    if not channels_last:  # NCHW input and cotangent, OIHW kernel
        x, g, w = x.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    return (np.ascontiguousarray(a) for a in (x, w, g))


class FdqnLayers:
    def __init__(self):
        import jax

        import fdqn.cpu

        fdqn.cpu.tune()  # fdqn's XLA flag and malloc settings, before JAX starts
        from fdqn.cpu import conv2d

        self.jax, self.conv2d = jax, conv2d

    def build(self, op: str):
        jax = self.jax
        layer, which = op.split(":")
        _, _, _, _, k, stride = LAYERS[layer]
        x, w, g = (jax.device_put(a) for a in _arrays(layer, channels_last=True))
        if k == 0:
            fwd = jax.numpy.dot
        elif stride == 1:

            def fwd(x, w):
                return jax.lax.conv_general_dilated(
                    x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
        else:
            form = "space_to_depth" if layer == "notebook/conv1" else "direct"

            def fwd(x, w):
                return self.conv2d(x, w, (stride, stride), form)

        if which == "forward":
            fn, args = jax.jit(fwd), (x, w)
        elif which == "kernel_grad":
            fn, args = jax.jit(lambda x, g: jax.vjp(lambda w: fwd(x, w), w)[1](g)[0]), (x, g)
        else:
            fn, args = jax.jit(lambda w, g: jax.vjp(lambda x: fwd(x, w), x)[1](g)[0]), (w, g)
        return lambda: jax.block_until_ready(fn(*args))


class TfLayers:
    def __init__(self):
        import tf_notebook  # imports TF with oneDNN's kernels on, as the update baselines run

        self.tf = tf_notebook.tf

    def build(self, op: str):
        tf = self.tf
        layer, which = op.split(":")
        _, _, _, _, k, stride = LAYERS[layer]
        x, w, g = (tf.constant(a) for a in _arrays(layer, channels_last=True))
        strides = [1, stride, stride, 1]
        if k == 0:
            fns = {
                "forward": lambda: tf.matmul(x, w),
                "kernel_grad": lambda: tf.matmul(x, g, transpose_a=True),
                "input_grad": lambda: tf.matmul(g, w, transpose_b=True),
            }
        else:
            fns = {
                "forward": lambda: tf.nn.conv2d(x, w, strides, "VALID"),
                "kernel_grad": lambda: tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=w.shape, out_backprop=g, strides=strides, padding="VALID"
                ),
                "input_grad": lambda: tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=x.shape, filter=w, out_backprop=g, strides=strides, padding="VALID"
                ),
            }
        fn = tf.function(fns[which])
        return lambda: fn().numpy()


class TorchLayers:
    def __init__(self):
        import torch

        self.torch = torch

    def build(self, op: str):
        torch = self.torch
        F = torch.nn.functional
        layer, which = op.split(":")
        _, _, _, _, k, stride = LAYERS[layer]
        x, w, g = (torch.from_numpy(a) for a in _arrays(layer, channels_last=False))
        if k == 0:
            fns = {
                "forward": lambda: x @ w,
                "kernel_grad": lambda: x.T @ g,
                "input_grad": lambda: g @ w.T,
            }
        else:
            fns = {
                "forward": lambda: F.conv2d(x, w, stride=stride),
                "kernel_grad": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=stride),
                "input_grad": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=stride),
            }

        def call():
            with torch.no_grad():
                return fns[which]()

        return call


def worker_main(spec: str) -> int:
    """Serves one implementation's ops to the driver (``compare.serve``)."""
    replies = compare.reply_channel()
    impl = json.loads(spec)["impl"]
    layers = {"fdqn": FdqnLayers, "tf_function": TfLayers, "torch": TorchLayers}[impl]()
    calls = {}

    def setup():  # build, compile or trace, and warm up every op
        for op in ops():
            calls[op] = layers.build(op)
            for _ in range(3):
                calls[op]()

    def run(command):
        call = calls[command["op"]]
        for _ in range(command["n"]):
            call()

    return compare.serve(replies, setup, run)


class LayerWorker(compare.Worker):
    script = os.path.abspath(__file__)


def measure(rounds: int, reps: int, log) -> dict:
    """Median ms per call of every op and implementation, taking turns pass by pass."""
    workers = [LayerWorker("layers", {}, impl) for impl in IMPLS]
    blocks = {op: {w.impl: [] for w in workers} for op in ops()}
    try:
        for w in workers:
            log(f"{w.impl}: built and warmed up in {w.ask(cmd='setup')['setup_s']:.1f} s")
        for r in range(rounds):
            order = workers[r % len(workers) :] + workers[: r % len(workers)]
            for op in ops():
                for w in order:
                    blocks[op][w.impl].append(w.ask(cmd="run", op=op, n=reps)["seconds"])
    finally:
        for w in workers:
            w.close()
    return {
        op: {impl: statistics.median(b) / reps * 1000 for impl, b in per_impl.items()}
        for op, per_impl in blocks.items()
    }


def network_sums(results: dict) -> dict:
    """Per network and implementation: forward x 2 + gradients, the kernels of one update."""
    sums = {}
    for op, per_impl in results.items():
        network = op.split("/")[0]
        weight = 2 if op.endswith(":forward") else 1
        for impl, ms in per_impl.items():
            sums.setdefault(network, {}).setdefault(impl, 0.0)
            sums[network][impl] += weight * ms
    return sums


def _table(results: dict, sums: dict) -> list[str]:
    head = f"{'layer:pass':30}" + "".join(f"{impl:>13}" for impl in IMPLS)
    ratios = "".join(f"{'fdqn/' + impl.split('_')[0]:>13}" for impl in IMPLS[1:])
    lines = [head + ratios]
    for op, per_impl in list(results.items()) + [
        (f"{n}: update's kernels", s) for n, s in sums.items()
    ]:
        cells = "".join(f"{per_impl[impl]:13.2f}" for impl in IMPLS)
        rel = "".join(f"{per_impl['fdqn'] / per_impl[impl]:13.2f}" for impl in IMPLS[1:])
        lines.append(f"{op:30}{cells}{rel}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="blocks per op and implementation")
    parser.add_argument("--reps", type=int, default=10, help="calls per block")
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    for name in ("rounds", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if importlib.util.find_spec("tensorflow") is None:
        parser.error('TensorFlow is not installed: pip install -e ".[tf]"')

    log, lines = compare.recorder()
    log(
        compare.machine_line(
            f"layer kernels, ms per call: {args.rounds} rounds of {args.reps} calls, medians"
        )
    )
    log(compare._versions())
    log(compare._malloc_line("tuned"))
    start = time.perf_counter()
    results = measure(args.rounds, args.reps, log)
    sums = network_sums(results)
    for line in _table(results, sums):
        log(line)
    log(
        f"ratios are fdqn's time over the baseline's (< 1: fdqn faster); "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    summary = {"rounds": args.rounds, "reps": args.reps, "ms": results, "update_kernels_ms": sums}
    compare.finish(lines, summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
