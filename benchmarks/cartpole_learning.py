"""Does the cartpole preset solve CartPole? Five seeds, each a full training run.

Target: a mean evaluation score of at least 475 (10 greedy games) within
50,000 agent steps for at least 4 of 5 seeds. Each seed runs
``python -m fdqn.train --preset cartpole --seed S`` in its own process (two at
a time on two cores); the steps at which the evaluation first reached 475 are
read from the run's ``eval.csv``. The last line of output is one JSON object.

    python benchmarks/cartpole_learning.py [--seeds 1 2 3 4 5] [--jobs 2] [--out DIR] [-- FLAGS]
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

TARGET = 475.0


def first_solved(run_dir: str) -> tuple[int | None, float]:
    best, solved = 0.0, None
    with open(os.path.join(run_dir, "eval.csv"), newline="") as f:
        for row in csv.DictReader(f):
            mean = float(row["mean"])
            best = max(best, mean)
            if solved is None and mean >= TARGET:
                solved = int(row["step"])
    return solved, best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--out", default=os.path.join("runs", "cartpole-bench"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to fdqn.train")
    args = parser.parse_args()
    if args.extra[:1] == ["--"]:
        args.extra = args.extra[1:]
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    pending = list(args.seeds)
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    wall: dict[int, float] = {}
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            cmd = [
                sys.executable, "-m", "fdqn.train", "--preset", "cartpole", "--seed", str(seed),
                "--run-dir", os.path.join(args.out, f"seed{seed}"), *args.extra,
            ]  # fmt: skip
            log = open(os.path.join(args.out, f"seed{seed}.log"), "w")
            running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=log), time.perf_counter())
        time.sleep(0.5)
        for seed, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                wall[seed] = time.perf_counter() - start
                if proc.returncode != 0:
                    failed.append(seed)
                del running[seed]
    results = []
    print(f"{'seed':>4} {'solved at step':>15} {'best eval':>10} {'wall s':>8}")
    for seed in args.seeds:
        if seed in failed:
            results.append({"seed": seed, "error": f"see {args.out}/seed{seed}.log"})
            print(f"{seed:>4} {'run failed':>15}")
            continue
        solved, best = first_solved(os.path.join(args.out, f"seed{seed}"))
        results.append({"seed": seed, "solved_at": solved, "best_eval": best, "wall_s": wall[seed]})
        print(f"{seed:>4} {str(solved or '-'):>15} {best:>10.1f} {wall[seed]:>8.0f}")
    n_solved = sum(1 for r in results if r.get("solved_at"))
    print(f"solved (eval mean >= {TARGET:g} within the run): {n_solved} of {len(results)} seeds")
    print(json.dumps({"target": TARGET, "solved": n_solved, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
