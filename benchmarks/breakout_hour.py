"""The default recipe on Breakout for as long as fits in a time budget, then scored.

Runs ``python -m fdqn.train`` with its defaults (the Nature recipe, 10M agent
steps) in a subprocess, stops it with SIGINT when the budget runs out (it
checkpoints and draws its learning curve), then plays 100 games with the
checkpoint at epsilon 0.05 and 100 games with a uniformly random policy,
through the same evaluation code, and reports the mean true game scores,
together with the mean score of the last 100 training games.
The last line of output is one JSON object.

    python benchmarks/breakout_hour.py [--minutes 60] [--out runs/breakout-hour] [-- FLAGS]

``-- --loop compiled`` trains in the compiled loop; its first seed's policy is
then scored by the same evaluation.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="training time budget")
    parser.add_argument("--games", type=int, default=100, help="games per evaluation")
    parser.add_argument("--out", default=os.path.join("runs", "breakout-hour"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to fdqn.train")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    shutil.rmtree(args.out, ignore_errors=True)
    log_path = args.out.rstrip("/") + ".log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fdqn.train", "--run-dir", args.out, *extra],
            stdout=log,
            stderr=log,
        )
        try:
            proc.wait(timeout=args.minutes * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait()
    train_seconds = time.perf_counter() - start
    if proc.returncode not in (0, 130):
        print(f"training failed with status {proc.returncode}: see {log_path}")
        return 1

    # imported here so that the training subprocess had both cores to itself
    from fdqn import seed_runs
    from fdqn.config import load_config, make_env, make_network
    from fdqn.evaluate import evaluate, load_run, load_seeds_run
    from fdqn.networks import pure_q_fn

    if seed_runs.ran_compiled(load_config(args.out), args.out):  # --loop compiled
        # the first seed's parameters, played by the same evaluation as the host loop's
        config, stacked, step = load_seeds_run(args.out)
        params = [np.asarray(p)[0] for p in stacked]
        env = make_env(config, num_envs=1)
        q_fn, _ = pure_q_fn(make_network(config, env))
        env.close()
    else:
        config, q_fn, params, step = load_run(args.out)
    with open(os.path.join(args.out, "metrics.csv"), newline="") as f:
        scores = [float(r["score"]) for r in csv.DictReader(f)]
    trained = evaluate(q_fn, params, config, args.games, 0.05, seed=2024)
    random = evaluate(q_fn, params, config, args.games, 1.0, seed=2024)
    result = {
        "env": config.env,
        "train_minutes": train_seconds / 60,
        "agent_steps": step,
        "training_games": len(scores),
        "last_100_training_games_mean": float(np.mean(scores[-100:])) if scores else None,
        "eval_epsilon_0.05_mean": float(trained.mean()),
        "eval_epsilon_0.05_std": float(trained.std()),
        "random_policy_mean": float(random.mean()),
        "random_policy_std": float(random.std()),
        "games_per_eval": args.games,
        "learning_curve": os.path.join(args.out, "learning_curve.png"),
    }
    print(
        f"{config.env}: {step:,} agent steps in {result['train_minutes']:.0f} min; "
        f"last 100 training games {result['last_100_training_games_mean']:.2f}; "
        f"{args.games} games at epsilon 0.05: {trained.mean():.2f} +- {trained.std():.2f}; "
        f"random policy: {random.mean():.2f} +- {random.std():.2f}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
