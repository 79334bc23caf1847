"""Evaluating a Q-network: play whole games with a small epsilon, report true scores.

    python -m fdqn.evaluate RUN_DIR [--checkpoint STEP] [--episodes 30] [--epsilon 0.05]
    python -m fdqn.evaluate MODEL.keras [--env ENV_ID] [...]

loads the run's config and newest intact checkpoint (or the one of
``--checkpoint STEP``; or a Keras model file, such as the ``model.keras`` a
run writes) and prints mean, median, spread of the unclipped game scores,
then one JSON object on its last line. A run of the compiled loop
(``--num-seeds``, ``--loop compiled``, MinAtar) is played by its own
compiled evaluator, every seed on games of its own, and reported per seed.
Evaluation uses environments of its own, so it never disturbs training.
"""

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from fdqn import checkpoint, envs, jax_envs, rundir, seed_runs
from fdqn.config import Config, load_config, make_env, make_network
from fdqn.networks import pure_q_fn
from fdqn.rollout import Rollout


def evaluate(
    q_fn: Callable,
    params: Any,
    config: Config,
    episodes: int,
    epsilon: float,
    seed: int,
    max_agent_steps: int = 5_000_000,
    frames: list | None = None,
) -> np.ndarray:
    """True scores of ``episodes`` games played by the epsilon-greedy policy.

    Up to 8 environments play at once; games are counted in the order they
    finish, and the first ``episodes`` are returned.

    Args:
      q_fn, params: the network.
      config: the run's config (environment and its options).
      episodes: number of games; positive.
      epsilon: exploration rate (0.05 for Atari, as in Mnih et al. 2015).
      seed: seeds the environments and the exploration.
      max_agent_steps: give up (RuntimeError) after this many agent steps.
      frames: if a list, the newest frame of environment 0's observation is
        appended to it at every step of its first game (pixel envs only).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    env = make_env(config, num_envs=min(episodes, 8))
    try:
        rollout = Rollout(env, q_fn, None, seed=seed)
        scores: list[float] = []
        recording = frames is not None
        while len(scores) < episodes:
            if recording:
                frames.append(np.asarray(rollout.obs[0, -1]))
            finished, _ = rollout.step(params, epsilon)
            recording = recording and not rollout.ended[0]
            scores.extend(float(s) for s in finished)
            if rollout.agent_steps > max_agent_steps:
                raise RuntimeError(
                    f"evaluation finished {len(scores)} of {episodes} games "
                    f"in {max_agent_steps:,} agent steps"
                )
    finally:
        env.close()
    return np.array(scores[:episodes])


def save_gif(frames: list, path: str, fps: int = 15) -> None:
    """Writes 84x84 grayscale frames as an animated GIF, scaled up 3x (needs Pillow)."""
    from PIL import Image

    images = [Image.fromarray(f).resize((f.shape[1] * 3, f.shape[0] * 3)) for f in frames]
    rundir.atomic_write(
        path,
        lambda f: images[0].save(
            f, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0
        ),
        binary=True,
    )


def load_run(
    run_dir: str, step: int | None = None, warn: Callable[[str], None] = lambda _: None
) -> tuple[Config, Callable, Any, int]:
    """Config, q_fn, parameters and step of a run's newest intact checkpoint (or of ``step``).

    A damaged newer checkpoint is skipped (``warn`` says which), never deleted.
    """
    config = load_config(run_dir)
    env = make_env(config, num_envs=1)
    q_fn, template = pure_q_fn(make_network(config, env))
    env.close()

    def restore(path: str) -> tuple[Any, int]:
        arrays, meta = checkpoint.load(path)
        return checkpoint.arrays_to_tree("params", arrays, template), meta["step"]

    _, (params, found), skipped = checkpoint.restore_newest(run_dir, restore, step=step)
    for path, reason in skipped:
        warn(f"warning: skipped damaged checkpoint {path}: {reason}")
    return config, q_fn, params, found


def load_seeds_run(
    run_dir: str, step: int | None = None, warn: Callable[[str], None] = lambda _: None
) -> tuple[Config, Any, int]:
    """Config, every seed's parameters (stacked on a seed axis) and step of a compiled run's
    newest intact checkpoint (or of ``step``).

    The parameters are the checkpoint's arrays ``run/1 .. run/P``: the learner is
    the run state's first field, and its leaves are the step count, then the
    online parameters (:class:`fdqn.learner.TrainState`). Only they are read,
    so a run of any layout (seeds, data-parallel, many processes) evaluates here.
    """
    config = load_config(run_dir)
    _, template = pure_q_fn(_evaluation_run(config, 1).model)

    def restore(path: str) -> tuple[Any, int]:
        arrays, meta = checkpoint.load(path)
        seeds = checkpoint.require(meta, "num_seeds", int, path)
        params = []
        for i, want in enumerate(template, start=1):
            got = arrays.get(f"run/{i}")
            if got is None or got.shape != (seeds, *want.shape) or got.dtype != want.dtype:
                raise checkpoint.CheckpointError(
                    f"{path}: run/{i} is not the parameters of {seeds} seed(s) of this network"
                )
            params.append(got)
        return params, meta["step"]

    _, (params, found), skipped = checkpoint.restore_newest(run_dir, restore, step=step)
    for path, reason in skipped:
        warn(f"warning: skipped damaged checkpoint {path}: {reason}")
    return config, params, found


def evaluate_seeds(
    config: Config, params: Any, episodes: int, epsilon: float, seed: int
) -> np.ndarray:
    """``(seeds, episodes)`` true scores: each seed's parameters (stacked on a leading
    axis) play games of their own in the compiled run's evaluator."""
    import jax

    seeds = int(np.shape(jax.tree.leaves(params)[0])[0])
    run = _evaluation_run(config, seeds)
    keys = jax.random.split(jax.random.key(seed), seeds)
    return np.asarray(run.evaluate(params, keys, episodes, epsilon)).reshape(seeds, episodes)


def _evaluation_run(config: Config, seeds: int):
    """The compiled run of ``config`` for ``seeds`` seeds on one device, with one game per
    seed to build it (its evaluator makes environments of its own)."""
    from fdqn import compiled

    return compiled.make_run(config.replace(num_seeds=seeds, num_envs=1, devices=1))


def check_writable(path: str) -> None:
    """Refuses (one-line ValueError) an output file that could not be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory: give a file name for the GIF")
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: {folder} is not writable")
    try:  # os.access does not see a read-only file system
        probe = tempfile.TemporaryFile(dir=folder)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from None
    probe.close()


def load_model_file(path: str, env_id: str | None) -> tuple[Config, Callable, Any]:
    """Config, q_fn and parameters for playing a Keras model file.

    The environment is ``env_id`` or, for a file inside a run directory
    (``RUN_DIR/model.keras``, ``RUN_DIR/checkpoints/step-N/model.keras``), the run's.
    """
    import keras

    if env_id is None:
        folder = os.path.dirname(os.path.abspath(path))
        for run_dir in (folder, os.path.dirname(os.path.dirname(folder))):
            if os.path.isfile(os.path.join(run_dir, "config.json")):
                config = load_config(run_dir)
                break
        else:
            raise ValueError(f"{path} is not inside a run directory: give --env ENV_ID")
    else:
        envs.check_env_id(env_id)
        config = Config(env=env_id)
    try:
        model = keras.saving.load_model(path)
    except Exception as e:  # Keras raises many kinds for a file it cannot read
        raise ValueError(f"cannot load Keras model file {path}: {e}") from None
    q_fn, params = pure_q_fn(model)
    return config, q_fn, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdqn.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "run_dir", help="a run directory written by python -m fdqn.train, or a .keras model file"
    )
    parser.add_argument(
        "--env", default=None, help="environment id for a model file outside a run directory"
    )
    parser.add_argument("--episodes", type=int, default=30, help="games to play (default 30)")
    parser.add_argument(
        "--epsilon", type=float, default=None, help="exploration rate (default: the run's)"
    )
    parser.add_argument("--seed", type=int, default=12345, help="seed (default 12345)")
    parser.add_argument("--gif", default=None, help="save the first game as a GIF (Atari only)")
    parser.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="the checkpoint of this agent step (default: the newest intact one)",
    )
    args = parser.parse_args(argv)
    model_file = args.run_dir.endswith(".keras")
    if not (os.path.isfile(args.run_dir) if model_file else os.path.isdir(args.run_dir)):
        kind = "a file" if model_file else "a directory"
        print(f"fdqn.evaluate: error: {args.run_dir} is not {kind}", file=sys.stderr)
        return 2
    if args.episodes < 1:
        print("fdqn.evaluate: error: --episodes must be a positive integer", file=sys.stderr)
        return 2
    if model_file and args.checkpoint is not None:
        print("fdqn.evaluate: error: --checkpoint needs a run directory", file=sys.stderr)
        return 2
    seeds = False  # played by the compiled run's evaluator, per seed
    try:
        if args.gif:
            check_writable(args.gif)
        if model_file:
            (config, q_fn, params), step = load_model_file(args.run_dir, args.env), None
            if jax_envs.is_minatar(config.env):  # gymnax only: no host env to play on
                seeds, params = True, [np.asarray(p)[None] for p in params]
        elif seed_runs.ran_compiled(load_config(args.run_dir), args.run_dir):
            seeds = True
            config, params, step = load_seeds_run(
                args.run_dir, args.checkpoint, warn=lambda text: print(text, file=sys.stderr)
            )
        else:
            config, q_fn, params, step = load_run(
                args.run_dir, args.checkpoint, warn=lambda text: print(text, file=sys.stderr)
            )
    except (ValueError, OSError) as e:
        print(f"fdqn.evaluate: error: {e}", file=sys.stderr)
        return 2
    epsilon = config.eval_epsilon if args.epsilon is None else args.epsilon
    if not 0.0 <= epsilon <= 1.0:
        print("fdqn.evaluate: error: --epsilon must be in [0, 1]", file=sys.stderr)
        return 2
    if args.gif and not envs.is_atari(config.env):
        print(f"fdqn.evaluate: error: --gif needs an Atari run, not {config.env}", file=sys.stderr)
        return 2
    if args.gif and seeds:
        print("fdqn.evaluate: error: --gif plays a model file or a run of the host loop; "
              "give RUN_DIR/model-seedN.keras", file=sys.stderr)  # fmt: skip
        return 2
    if seeds:
        return _report_seeds(args, config, params, step, epsilon)
    frames = [] if args.gif else None
    scores = evaluate(q_fn, params, config, args.episodes, epsilon, args.seed, frames=frames)
    if args.gif:
        try:
            save_gif(frames, args.gif)
        except OSError as e:
            print(
                f"fdqn.evaluate: error: {rundir.os_error_line(e, 'cannot write')}", file=sys.stderr
            )
            return 2
    summary = {
        "run_dir": args.run_dir,
        "step": step,
        "env": config.env,
        "epsilon": epsilon,
        "episodes": len(scores),
        "mean": float(scores.mean()),
        "median": float(np.median(scores)),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
    }
    where = f"at step {step:,}" if step is not None else f"from {args.run_dir}"
    print(
        f"{config.env} {where}: mean {summary['mean']:.2f}, median "
        f"{summary['median']:.2f}, std {summary['std']:.2f}, min {summary['min']:.0f}, "
        f"max {summary['max']:.0f} over {len(scores)} games (epsilon {epsilon})"
    )
    print(json.dumps(summary))
    return 0


def _report_seeds(args, config: Config, params: Any, step: int | None, epsilon: float) -> int:
    """Every seed's games in the compiled evaluator: a line per seed, then the JSON."""
    scores = evaluate_seeds(config, params, args.episodes, epsilon, args.seed)
    where = f"at step {step:,}" if step is not None else f"from {args.run_dir}"
    seeds = [config.seed + i for i in range(len(scores))] if step is not None else [None]
    for seed, s in zip(seeds, scores):
        which = "" if seed is None else f", seed {seed}"
        print(
            f"{config.env} {where}{which}: mean {s.mean():.2f}, median "
            f"{np.median(s):.2f}, std {s.std():.2f}, min {s.min():.0f}, max {s.max():.0f} "
            f"over {len(s)} games (epsilon {epsilon})"
        )
    summary = {
        "run_dir": args.run_dir,
        "step": step,
        "env": config.env,
        "epsilon": epsilon,
        "episodes": args.episodes,
        "seeds": seeds,
        "seed_means": [float(s.mean()) for s in scores],
        "mean": float(scores.mean()),
        "median": float(np.median(scores)),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
