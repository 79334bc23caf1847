"""Throughput of the data side: environments, rollout, replay memory.

Measures, on Breakout:
  - raw ale-py ``AtariVectorEnv`` agent steps per second, random actions,
    with the game settings ``fdqn.envs.make`` uses (no sticky actions, up to
    30 no-ops and FIRE on reset, frameskip 4, a stack of 4);
  - the same through ``fdqn.envs.make`` (life-loss info, reward clipping,
    episode statistics);
  - ``fdqn.Rollout`` writing to a replay memory at epsilon 1 (random actions,
    as before learning starts: the network is not evaluated), and with the
    jitted Nature-CNN epsilon-greedy policy at epsilon 0.05 (the network runs
    every step);
  - the epsilon-1 rollout again with ``prefault=False``: a replay memory
    whose pages the kernel maps on first write (what it was before);
  - replay memory insert (agent steps/s, first pass through a prefaulted and
    a lazily mapped memory) and sample (batches of 32/s);
  - bytes per stored Atari transition at a capacity of 1,000,000.

Raw env, wrapped env and the rollouts are measured alternately
(A B C D E A B C D E ...) for each N so that machine drift hits all of them;
medians are reported, and each rollout's median ratio to the raw env over
the rounds (its time next to the raw env's time of the same round). Two
instances of the same game run at speeds up to 10% apart over a few hundred
random steps, so each loop also reports the share of its own time spent
inside ale-py's ``step`` of its own env instance. The raw env's loop, which
draws random actions in Python and calls ``step``, gives the reference
share; what a rollout adds is the difference.
The last line of output is one JSON object with every figure.

    python benchmarks/data_throughput.py            # N = 1, 4, 8, 16
    python benchmarks/data_throughput.py --quick    # N = 1, 8, shorter
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np

import fdqn
import fdqn.cpu
from fdqn import envs

fdqn.cpu.tune()  # as fdqn.train does on a CPU


class EnvClock:
    """Time a vector env spends inside ale-py's own ``step``, under all of fdqn's wrappers."""

    def __init__(self, env):
        inner, self.seconds = env.unwrapped, 0.0
        step = inner.step

        def timed_step(actions):
            start = time.perf_counter()
            try:
                return step(actions)
            finally:
                self.seconds += time.perf_counter() - start

        inner.step = timed_step  # the wrappers look it up on the instance


def time_steps(step, n_steps, clock=None):
    step()  # warm-up (and jit compilation for the rollout)
    if clock is not None:
        clock.seconds = 0.0
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return time.perf_counter() - start


def bench_envs(num_envs, n_steps, repeats):
    rng = np.random.default_rng(0)
    raw = envs.make("breakout", num_envs).unwrapped  # ale-py's env, made as fdqn makes it
    raw.reset(seed=0)
    wrapped = envs.make("breakout", num_envs)
    wrapped.reset(seed=0)
    q_fn, params = fdqn.pure_q_fn(fdqn.nature_cnn(4))

    def new_rollout(seed, prefault=True):
        memory = fdqn.ReplayMemory(
            max(100_000, num_envs),
            num_envs,
            (4, 84, 84),
            np.uint8,
            frame_stack=4,
            prefault=prefault,
        )
        return fdqn.Rollout(envs.make("breakout", num_envs), q_fn, memory, seed=seed)

    rollout, random_rollout = new_rollout(0), new_rollout(1)
    lazy_rollout = new_rollout(2, prefault=False)
    clocks = {  # the raw env's own loop too: the share its Python driving loop leaves
        "raw_env": EnvClock(raw),
        "fdqn_env": EnvClock(wrapped),
        "rollout_random": EnvClock(random_rollout.env),
        "rollout_random_lazy": EnvClock(lazy_rollout.env),
        "rollout": EnvClock(rollout.env),
    }

    def raw_step():
        raw.step(rng.integers(0, 4, num_envs, dtype=np.int32))

    def wrapped_step():
        wrapped.step(rng.integers(0, 4, num_envs, dtype=np.int32))

    def rollout_step():
        rollout.step(params, 0.05)

    def random_rollout_step():
        random_rollout.step(params, 1.0)

    def lazy_rollout_step():
        lazy_rollout.step(params, 1.0)

    steps = {
        "raw_env": raw_step,
        "fdqn_env": wrapped_step,
        "rollout_random": random_rollout_step,
        "rollout_random_lazy": lazy_rollout_step,
        "rollout": rollout_step,
    }
    times = {name: [] for name in steps}
    in_env = {name: [] for name in clocks}  # share of each block spent in ale-py's step
    for _ in range(repeats):
        for name, fn in steps.items():
            seconds = time_steps(fn, n_steps, clocks.get(name))
            times[name].append(num_envs * n_steps / seconds)
            if name in clocks:
                in_env[name].append(clocks[name].seconds / seconds)
    raw.close()
    wrapped.close()
    for r in (rollout, random_rollout, lazy_rollout):
        r.env.close()
    result = {name: statistics.median(v) for name, v in times.items()}
    for name in steps:
        if name != "raw_env":
            pairs = zip(times[name], times["raw_env"])
            result[f"{name}_vs_raw"] = statistics.median(a / b for a, b in pairs)
    for name, shares in in_env.items():
        result[f"{name}_in_env"] = statistics.median(shares)
    return result


def bench_replay(num_envs=8, n_steps=2_000, n_samples=500):
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (num_envs, 4, 84, 84), dtype=np.uint8)
    actions = np.zeros(num_envs, np.int32)
    rewards = np.zeros(num_envs, np.float32)
    terminal = rng.random((n_steps, num_envs)) < 0.01
    insert = {}
    for prefault in (True, False):
        memory = fdqn.ReplayMemory(
            100_000, num_envs, (4, 84, 84), np.uint8, frame_stack=4, prefault=prefault
        )
        memory.start(obs)
        start = time.perf_counter()
        for t in range(n_steps):
            memory.add(actions, rewards, obs, terminal[t], terminal[t - 1] if t else None)
        insert[prefault] = num_envs * n_steps / (time.perf_counter() - start)
    memory.sample(32)
    start = time.perf_counter()
    for _ in range(n_samples):
        memory.sample(32)
    sample = n_samples / (time.perf_counter() - start)
    big = fdqn.ReplayMemory(1_000_000, 8, (4, 84, 84), np.uint8, frame_stack=4, prefault=False)
    return {
        "replay_insert_agent_steps_per_s": insert[True],
        "replay_insert_lazy_pages_agent_steps_per_s": insert[False],
        "replay_sample_batches32_per_s": sample,
        "bytes_per_atari_transition": big.nbytes() / big.capacity,
        "bytes_per_transition_naive": 2 * 4 * 84 * 84,
    }


def _cell(result, name, width):
    return f"{result[name]:.0f} ({result[name + '_vs_raw']:.2f})".rjust(width)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 8 and fewer steps")
    args = parser.parse_args()
    sizes = (1, 8) if args.quick else (1, 4, 8, 16)
    n_steps, repeats = (150, 2) if args.quick else (300, 7)

    results = {"machine": f"{platform.processor() or platform.machine()}", "env": {}}
    print("agent steps/s (median); in brackets the median ratio to the raw env")
    print(
        f"{'N':>3} {'raw env':>8} {'fdqn env':>14} {'rollout eps=1':>14} "
        f"{'eps=1, lazy pages':>18} {'rollout eps=0.05':>17}"
    )
    for n in sizes:
        r = bench_envs(n, n_steps, repeats)
        results["env"][n] = r

        print(
            f"{n:>3} {r['raw_env']:>8.0f} {_cell(r, 'fdqn_env', 14)} "
            f"{_cell(r, 'rollout_random', 14)} {_cell(r, 'rollout_random_lazy', 18)} "
            f"{_cell(r, 'rollout', 17)}"
        )
    print(
        "share of each loop's time spent inside ale-py's own step of its env instance (median "
        "over rounds; the rest is the Python loop, fdqn's wrappers, policy and replay writes)"
    )
    print(
        f"{'N':>3} {'raw env':>8} {'fdqn env':>9} {'rollout eps=1':>14} "
        f"{'eps=1, lazy pages':>18} {'rollout eps=0.05':>17}"
    )
    for n, r in results["env"].items():
        print(
            f"{n:>3} {r['raw_env_in_env']:>8.3f} {r['fdqn_env_in_env']:>9.3f} "
            f"{r['rollout_random_in_env']:>14.3f} {r['rollout_random_lazy_in_env']:>18.3f} "
            f"{r['rollout_in_env']:>17.3f}"
        )
    replay = bench_replay()
    results.update(replay)
    for k, v in replay.items():
        print(f"{k}: {v:,.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
