"""The compiled run against fdqn's host loop on Breakout, the default Nature recipe, 8 envs.

    python benchmarks/compiled_breakout.py [--rounds 3] [--steps 9000] [--from 3000]

Both train the default recipe (Nature CNN, Adam 1e-4, global-norm clipping
at 10, batch 32, one update every 4 agent steps, 8 environments) with
learning from agent step 1,000, a 100,000-transition replay and the CPU
tuning ``python -m fdqn.train`` applies on a CPU (XLA flags, malloc options,
space-to-depth convolutions). The figure is agent steps per second of the
learning phase between agent steps ``--from`` and ``--steps``: for the
compiled run the time of that chunk, for the host loop the difference of
two runs' times (to ``--steps`` and to ``--from``), so that neither
includes compilation or the steps before learning starts. The two run in
turns within each round (the order alternates); medians and their ratio
are printed.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fdqn import cpu  # noqa: E402

TUNING = cpu.tune()  # before JAX starts: both contenders run with it

import jax  # noqa: E402

from fdqn import train as host  # noqa: E402
from fdqn.compiled import make_run  # noqa: E402
from fdqn.config import Config  # noqa: E402


def config(total_steps: int, seed: int) -> Config:
    return Config(
        env="BreakoutNoFrameskip-v4", total_steps=total_steps, buffer_size=100_000,
        learning_starts=1_000, eval_every=0, checkpoint_every=0, log_every=10**9, seed=seed,
    ).validate()  # fmt: skip


class Compiled:
    name = "fdqn compiled"

    def __init__(self, steps: int, start: int):
        self.run = make_run(config(steps, 1), cpu_layers=True)
        self.first = self.run.steps_for(start)
        self.rest = self.run.steps_for(steps) - self.first
        t = time.perf_counter()
        state = self.run.init(1)
        state, _ = self.run.run(state, self.first)
        jax.block_until_ready(self.run.run(state, self.rest))
        self.compile_s = time.perf_counter() - t  # compile plus one run

    def __call__(self, round_: int) -> float:
        state = self.run.init(1000 * (round_ + 1))
        state, _ = self.run.run(state, self.first)
        jax.block_until_ready(state)
        t = time.perf_counter()
        state, _ = self.run.run(state, self.rest)
        jax.block_until_ready(state)
        return self.rest * self.run.env.num_envs / (time.perf_counter() - t)


class HostLoop:
    name = "fdqn host loop"
    compile_s = float("nan")

    def __init__(self, steps: int, start: int):
        self.steps, self.start = steps, start

    def _time(self, total: int, seed: int) -> tuple[float, int]:
        cfg = config(total, seed)
        with tempfile.TemporaryDirectory() as run_dir, open(os.devnull, "w") as null:
            run = host.build(cfg, cpu_layers=True)
            t = time.perf_counter()
            summary = host.train(cfg, run_dir, stream=null, run=run)
            return time.perf_counter() - t, summary["agent_steps"]

    def __call__(self, round_: int) -> float:
        seed = 1000 * (round_ + 1)
        long_s, long_steps = self._time(self.steps, seed)
        short_s, short_steps = self._time(self.start, seed)
        return (long_steps - short_steps) / (long_s - short_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=9_000)
    parser.add_argument("--from", dest="start", type=int, default=3_000)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}; {TUNING}")
    contenders = [Compiled(args.steps, args.start), HostLoop(args.steps, args.start)]
    rates = {c.name: [] for c in contenders}
    for r in range(args.rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            rates[c.name].append(c(r))
            print(f"  round {r + 1}: {c.name}: {rates[c.name][-1]:,.0f} agent steps/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print(f"\nBreakout, default recipe, 8 envs, agent steps {args.start:,}-{args.steps:,}")
    for c in contenders:
        v = rates[c.name]
        print(
            f"  {c.name:15s} median {medians[c.name]:7,.0f} agent steps/s "
            f"(range {min(v):,.0f}-{max(v):,.0f}); compile (+1 run) {c.compile_s:.1f} s"
        )
    ratio = medians["fdqn compiled"] / medians["fdqn host loop"]
    print(f"  compiled / host loop: x{ratio:.2f}")


if __name__ == "__main__":
    main()
