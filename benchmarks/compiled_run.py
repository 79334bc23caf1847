"""The compiled run against fdqn's host loop and rejax's DQN, on CartPole-v1; and many seeds.

    python benchmarks/compiled_run.py [--rounds 3] [--long] [--seeds 1,4,16,64]

One configuration for all (CleanRL's DQN on CartPole as rejax can be set to
it): 10 environments, one update every 10 agent steps, batch 128, buffer
10,000, MLP 120-84 ReLU, Adam 2.5e-4, no clipping, squared loss, target copy
every 500 agent steps, learning from agent step 10,000, epsilon 1 to 0.05
over half the run. The three run in turns within each round (the order
rotates); each figure is agent steps per second of a whole run after
compilation, and the median over rounds is printed with the ratios.
Compilation is timed separately. rejax (``pip install rejax``) is skipped
with a message when missing; gymnax 1.0's six-value step is adapted to the
five values rejax 0.1.3 expects (done = terminated or truncated, which is
rejax's own choice).

``--seeds`` runs S agents in one compiled program and reports aggregate
agent steps per second. ``--minatar`` runs only the ``minatar`` preset
(MinAtar Breakout), with the CPU tuning of ``python -m fdqn.train``, for 1
seed (stock layers and ``fdqn.cpu.cpu_model``'s) and 10 seeds: agent steps
per second of its learning phase.
``--long`` adds 500,000-step runs (compiled and rejax only: fdqn's host loop
would take minutes per round).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fdqn import train as host  # noqa: E402
from fdqn.compiled import make_run  # noqa: E402
from fdqn.config import Config  # noqa: E402


def config(total_steps: int) -> Config:
    return Config(
        env="CartPole-v1", network="mlp", hidden=(120, 84), num_envs=10,
        total_steps=total_steps, optimizer="adam", lr=2.5e-4, batch_size=128,
        buffer_size=10_000, learning_starts=10_000, train_every=10, target_update=500,
        clip="none", huber_delta=0.0, epsilon_start=1.0, epsilon_end=0.05,
        exploration_fraction=0.5, terminal_on_life_loss=False, eval_every=0,
        checkpoint_every=0, log_every=10**9,
    ).validate()  # fmt: skip


class Compiled:
    name = "fdqn compiled"

    def __init__(self, total_steps: int, seeds: int = 1):
        self.run = make_run(config(total_steps))
        self.steps = self.run.steps_for(total_steps)
        self.seeds = seeds
        start = time.perf_counter()
        state = self._init(0)
        jax.block_until_ready(self.run.run(state, self.steps))
        self.compile_s = time.perf_counter() - start  # compile plus one run
        self.returns = None

    def _init(self, round_: int):
        base = 1000 * (round_ + 1)
        return self.run.init(base if self.seeds == 1 else [base + i for i in range(self.seeds)])

    def __call__(self, round_: int) -> float:
        state = self._init(round_)
        jax.block_until_ready(state)
        start = time.perf_counter()
        state, metrics = self.run.run(state, self.steps)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - start
        done, returns = np.asarray(metrics.done), np.asarray(metrics.episode_return)
        self.returns = returns[done][-20:].mean() if done.any() else float("nan")
        return self.seeds * self.steps * self.run.env.num_envs / elapsed


class HostLoop:
    name = "fdqn host loop"

    def __init__(self, total_steps: int):
        self.config = config(total_steps)
        self.compile_s = float("nan")  # compiled within the run (its first steps)
        self.returns = None

    def __call__(self, round_: int) -> float:
        cfg = self.config.replace(seed=1000 * (round_ + 1))
        with tempfile.TemporaryDirectory() as run_dir, open(os.devnull, "w") as null:
            run = host.build(cfg)
            start = time.perf_counter()
            summary = host.train(cfg, run_dir, stream=null, run=run)
            elapsed = time.perf_counter() - start
        self.returns = summary["mean_score_last_100"]
        return summary["agent_steps"] / elapsed


class Rejax:
    name = "rejax DQN"

    def __init__(self, total_steps: int):
        import gymnax
        from rejax import get_algo

        env, params = gymnax.make("CartPole-v1")
        algo = get_algo("dqn").create(
            env=_FiveValueStep(env), env_params=params, num_envs=10,
            total_timesteps=total_steps, buffer_size=10_000, fill_buffer=10_000,
            batch_size=128, learning_rate=2.5e-4, target_update_freq=500, polyak=0.0,
            eps_start=1.0, eps_end=0.05, exploration_fraction=0.5, gamma=0.99, ddqn=False,
            eval_freq=total_steps, skip_initial_evaluation=True,
            agent_kwargs=dict(activation="relu"), agent="QNetwork",
        )  # fmt: skip
        self.algo = algo.replace(eval_callback=lambda algo, ts, rng: ())
        self.total_steps = total_steps
        self._train = jax.jit(self.algo.train)
        start = time.perf_counter()
        jax.block_until_ready(self._train(jax.random.key(0)))
        self.compile_s = time.perf_counter() - start
        self.returns = None

    def __call__(self, round_: int) -> float:
        key = jax.random.key(1000 * (round_ + 1))
        start = time.perf_counter()
        jax.block_until_ready(self._train(key))
        return self.total_steps / (time.perf_counter() - start)


class _FiveValueStep:
    """A gymnax 1.0 environment with the five-value ``step`` rejax 0.1.3 expects."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        if name.startswith("__") or name == "_env":
            raise AttributeError(name)
        return getattr(self._env, name)

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        return obs, state, reward, terminated | truncated, info


def side_by_side(contenders, rounds: int) -> dict[str, list[float]]:
    rates = {c.name: [] for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for c in order:
            rates[c.name].append(c(r))
            print(f"  round {r + 1}: {c.name}: {rates[c.name][-1]:,.0f} steps/s", flush=True)
    return rates


def report(title: str, contenders, rates) -> None:
    print(f"\n{title}")
    medians = {name: statistics.median(v) for name, v in rates.items()}
    first = contenders[0].name
    for c in contenders:
        m = medians[c.name]
        spread = f"{min(rates[c.name]):,.0f}-{max(rates[c.name]):,.0f}"
        print(
            f"  {c.name:16s} median {m:9,.0f} steps/s (range {spread}), "
            f"{first} / this: x{medians[first] / m:.2f}; compile (+1 run) {c.compile_s:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long", action="store_true", help="add 500,000-step runs")
    parser.add_argument("--seeds", default="1,4,16,64", help="seed counts for the scaling run")
    parser.add_argument("--minatar", action="store_true", help="MinAtar Breakout only")
    args = parser.parse_args()
    if args.minatar:
        from fdqn import cpu

        tuning = cpu.tune()  # as python -m fdqn.train does, before JAX starts
        print(f"jax {jax.__version__}, devices {jax.devices()}; {tuning}")
        minatar(args.rounds)
        return
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    try:
        import rejax  # noqa: F401

        have_rejax = True
    except ImportError as e:
        print(f"rejax not installed ({e}): its column is skipped")
        have_rejax = False

    contenders = [Compiled(50_000), HostLoop(50_000)] + ([Rejax(50_000)] if have_rejax else [])
    report("CartPole-v1, 50,000 agent steps", contenders, side_by_side(contenders, args.rounds))
    if args.long:
        long = [Compiled(500_000)] + ([Rejax(500_000)] if have_rejax else [])
        rates = side_by_side(long, max(1, args.rounds - 1))
        report("CartPole-v1, 500,000 agent steps", long, rates)

    print("\nseeds in one program, 50,000 agent steps each (aggregate agent steps/s)")
    base = None
    for s in (int(x) for x in args.seeds.split(",")):
        c = Compiled(50_000, seeds=s)
        rate = statistics.median(c(r) for r in range(2))
        base = base or rate
        print(
            f"  S={s:3d}: {rate:10,.0f} steps/s, x{rate / base:.2f} of S=1; "
            f"compile (+1 run) {c.compile_s:.1f} s"
        )


def minatar(rounds: int, steps: int = 40_000) -> None:
    """The minatar preset after learning starts: agent steps/s for 1 and 10 seeds.

    One seed with the stock Keras network and with its ``fdqn.cpu.cpu_model``
    copy (what ``python -m fdqn.train`` uses on a CPU), in turns; ten seeds
    with the latter.
    """
    from fdqn.config import preset

    cfg = preset("minatar").replace(learning_starts=5_000, eval_every=0).validate()
    runs = {"stock Conv2D": make_run(cfg), "cpu_model": make_run(cfg, cpu_layers=True)}
    some = next(iter(runs.values()))
    warm, timed = some.steps_for(cfg.learning_starts), some.steps_for(steps)
    print(f"\nMinAtar Breakout, the minatar preset, agent steps 5,000-{5_000 + steps:,}")

    def learning(run, round_: int, s: int):
        state = run.init([1000 * (round_ + 1) + i for i in range(s)])
        state, _ = run.run(state, warm)
        return jax.block_until_ready(state)

    def rate(run, round_: int, s: int) -> float:
        state = learning(run, round_, s)
        start = time.perf_counter()
        jax.block_until_ready(run.run(state, timed))
        return s * timed * cfg.num_envs / (time.perf_counter() - start)

    cases = [(name, run, 1) for name, run in runs.items()] + [("cpu_model", runs["cpu_model"], 10)]
    for _, run, s in cases:
        jax.block_until_ready(run.run(learning(run, -1, s), timed))  # compiles both lengths
    rates = {(name, s): [] for name, _, s in cases}
    for r in range(rounds):
        for name, run, s in cases if r % 2 == 0 else cases[::-1]:
            rates[name, s].append(rate(run, r, s))
    for (name, s), v in rates.items():
        print(f"  S={s:3d}, {name:12s}: median {statistics.median(v):9,.0f} agent steps/s "
              f"(range {min(v):,.0f}-{max(v):,.0f}) over all seeds")  # fmt: skip


if __name__ == "__main__":
    main()
