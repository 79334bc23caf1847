"""Throughput of the data side: environments, rollout, replay memory.

Measures, on Breakout:
  - raw ale-py ``AtariVectorEnv`` agent steps per second, random actions;
  - the same through ``fdqn.envs.make`` (life-loss info, reward clipping,
    episode statistics);
  - ``fdqn.Rollout`` writing to a replay memory at epsilon 1 (random actions,
    as before learning starts: the network is not evaluated), and with the
    jitted Nature-CNN epsilon-greedy policy at epsilon 0.05 (the network runs
    every step);
  - replay memory insert (agent steps/s) and sample (batches of 32/s);
  - bytes per stored Atari transition at a capacity of 1,000,000.

Raw env, wrapped env and the two rollouts are measured alternately
(A B C D A B C D ...) for each N so that machine drift hits all of them;
medians are reported.
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
from ale_py.vector_env import AtariVectorEnv

import fdqn
from fdqn import envs


def time_steps(step, n_steps):
    step()  # warm-up (and jit compilation for the rollout)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return time.perf_counter() - start


def bench_envs(num_envs, n_steps, repeats):
    rng = np.random.default_rng(0)
    raw = AtariVectorEnv("breakout", num_envs, reward_clipping=False)
    raw.reset(seed=0)
    wrapped = envs.make("breakout", num_envs)
    wrapped.reset(seed=0)
    q_fn, params = fdqn.pure_q_fn(fdqn.nature_cnn(4))

    def new_rollout(seed):
        memory = fdqn.ReplayMemory(
            max(100_000, num_envs), num_envs, (4, 84, 84), np.uint8, frame_stack=4
        )
        return fdqn.Rollout(envs.make("breakout", num_envs), q_fn, memory, seed=seed)

    rollout, random_rollout = new_rollout(0), new_rollout(1)

    def raw_step():
        raw.step(rng.integers(0, 4, num_envs, dtype=np.int32))

    def wrapped_step():
        wrapped.step(rng.integers(0, 4, num_envs, dtype=np.int32))

    def rollout_step():
        rollout.step(params, 0.05)

    def random_rollout_step():
        random_rollout.step(params, 1.0)

    times = {"raw_env": [], "fdqn_env": [], "rollout_random": [], "rollout": []}
    for _ in range(repeats):
        for name, fn in (
            ("raw_env", raw_step),
            ("fdqn_env", wrapped_step),
            ("rollout_random", random_rollout_step),
            ("rollout", rollout_step),
        ):
            times[name].append(num_envs * n_steps / time_steps(fn, n_steps))
    raw.close()
    wrapped.close()
    rollout.env.close()
    random_rollout.env.close()
    return {name: statistics.median(v) for name, v in times.items()}


def bench_replay(num_envs=8, n_steps=2_000, n_samples=500):
    rng = np.random.default_rng(0)
    memory = fdqn.ReplayMemory(100_000, num_envs, (4, 84, 84), np.uint8, frame_stack=4)
    obs = rng.integers(0, 256, (num_envs, 4, 84, 84), dtype=np.uint8)
    memory.start(obs)
    actions = np.zeros(num_envs, np.int32)
    rewards = np.zeros(num_envs, np.float32)
    terminal = rng.random((n_steps, num_envs)) < 0.01
    start = time.perf_counter()
    for t in range(n_steps):
        memory.add(actions, rewards, obs, terminal[t], terminal[t - 1] if t else None)
    insert = num_envs * n_steps / (time.perf_counter() - start)
    memory.sample(32)
    start = time.perf_counter()
    for _ in range(n_samples):
        memory.sample(32)
    sample = n_samples / (time.perf_counter() - start)
    big = fdqn.ReplayMemory(1_000_000, 8, (4, 84, 84), np.uint8, frame_stack=4)  # lazily zeroed
    return {
        "replay_insert_agent_steps_per_s": insert,
        "replay_sample_batches32_per_s": sample,
        "bytes_per_atari_transition": big.nbytes() / big.capacity,
        "bytes_per_transition_naive": 2 * 4 * 84 * 84,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 8 and fewer steps")
    args = parser.parse_args()
    sizes = (1, 8) if args.quick else (1, 4, 8, 16)
    n_steps, repeats = (150, 2) if args.quick else (400, 3)

    results = {"machine": f"{platform.processor() or platform.machine()}", "env": {}}
    print(
        f"{'N':>3} {'raw env':>10} {'fdqn env':>10} {'rollout eps=1':>14} "
        f"{'rollout eps=0.05':>17}   agent steps/s (median)"
    )
    for n in sizes:
        r = bench_envs(n, n_steps, repeats)
        results["env"][n] = r
        print(
            f"{n:>3} {r['raw_env']:>10.0f} {r['fdqn_env']:>10.0f} "
            f"{r['rollout_random']:>14.0f} {r['rollout']:>17.0f}"
        )
    replay = bench_replay()
    results.update(replay)
    for k, v in replay.items():
        print(f"{k}: {v:,.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
