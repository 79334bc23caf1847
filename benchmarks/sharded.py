"""The compiled run on one device against the same run over a mesh of forced host devices.

    python benchmarks/sharded.py [--rounds 5] [--devices 4] [--seeds 16] [--steps 20000]

The CartPole-v1 configuration of ``compiled_run.py`` (10 envs per seed, an
update of batch 128 every 10 agent steps, learning from step 10,000; here
``--steps`` agent steps per seed after learning started). XLA is given
``--devices`` host devices (``--xla_force_host_platform_device_count``).
Two comparisons, each run in alternating turns, a fresh state per round,
timing only the steps after learning starts:

- seeds: ``--seeds`` agents vmapped on device 0 against the same agents
  split over all devices (``seeds`` axis; each seed the same result);
- data: one agent of 8 envs on device 0 against it data-parallel over all
  devices (``data`` axis: its envs, replay and batch of 128 split, the
  gradients averaged); ``--devices`` must divide 8.

Host devices share the machine's cores: on a small CPU, expect no speed-up.
The figure is the overhead of sharding (partitioned programs, collectives).
"""

import argparse
import os
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--seeds", type=int, default=16)
parser.add_argument("--steps", type=int, default=20_000)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
)

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fdqn import parallel  # noqa: E402
from fdqn.compiled import make_run  # noqa: E402
from fdqn.config import Config  # noqa: E402


def config(num_envs: int, batch_size: int) -> Config:
    return Config(
        env="CartPole-v1", network="mlp", hidden=(120, 84), num_envs=num_envs,
        total_steps=10**9, optimizer="adam", lr=2.5e-4, batch_size=batch_size,
        buffer_size=10_000, learning_starts=10_000, train_every=10, target_update=500,
        clip="none", huber_delta=0.0, epsilon_start=1.0, epsilon_end=0.05,
        exploration_fraction=0.5, eval_every=0, checkpoint_every=0,
    ).validate()  # fmt: skip


class Contender:
    def __init__(self, name, cfg, seeds, mesh=None):
        self.name, self.seeds = name, seeds
        self.run = make_run(cfg, mesh=mesh)
        self.warm = self.run.steps_for(cfg.learning_starts)
        self.timed = self.run.steps_for(args.steps)
        start = time.perf_counter()
        self(-1)  # compiles both lengths
        self.compile_s = time.perf_counter() - start

    def __call__(self, round_: int) -> float:
        state = self.run.init([1000 * (round_ + 2) + i for i in range(self.seeds)])
        state, _ = self.run.run(state, self.warm)
        jax.block_until_ready(state)
        start = time.perf_counter()
        state, _ = self.run.run(state, self.timed)
        jax.block_until_ready(state)
        return self.seeds * self.timed * self.run.num_envs / (time.perf_counter() - start)


def compare(title, contenders):
    rates = {c.name: [] for c in contenders}
    for r in range(args.rounds):
        for c in contenders[r % 2 :] + contenders[: r % 2]:
            rates[c.name].append(c(r))
    print(f"\n{title}")
    base = statistics.median(rates[contenders[0].name])
    for c in contenders:
        m = statistics.median(rates[c.name])
        print(
            f"  {c.name:34s} median {m:10,.0f} agent steps/s "
            f"(range {min(rates[c.name]):,.0f}-{max(rates[c.name]):,.0f}), x{m / base:.2f}; "
            f"compile (+1 run) {c.compile_s:.1f} s"
        )


def main():
    d = len(jax.devices())
    print(f"{d} {jax.devices()[0].platform} devices; {os.cpu_count()} cores; "
          f"{args.rounds} rounds, {args.steps:,} agent steps per seed timed")  # fmt: skip
    seeds_mesh = parallel.make_mesh(parallel.Layout(d, 1))
    compare(
        f"{args.seeds} seeds (10 envs each): one device against {d}",
        [
            Contender("1 device (vmap)", config(10, 128), args.seeds),
            Contender(f"{d} devices, seeds split", config(10, 128), args.seeds, seeds_mesh),
        ],
    )
    if 8 % d:
        print(f"\ndata-parallel skipped: 8 envs do not split over {d} devices")
        return
    data_mesh = parallel.make_mesh(parallel.Layout(1, d))
    compare(
        f"one seed, 8 envs, batch 128: one device against {d} data-parallel",
        [
            Contender("1 device", config(8, 128), 1),
            Contender(f"{d} devices, envs and batch split", config(8, 128), 1, data_mesh),
        ],
    )


if __name__ == "__main__":
    main()
