"""The compiled training loop from the command line: ``--loop compiled``, ``--num-seeds S``.

The run is :mod:`fdqn.compiled`'s, compiled in chunks of agent steps, with
many seeds in one program: gymnax environments map over the seeds, Atari
(ale-py's XLA calls) and other gymnasium environments (host callbacks) are
one vector env with a block of games per seed. Between chunks the host
writes what the program returned:

- ``metrics.csv``: a row per finished game and seed (``step``, ``seed``,
  ``episode``, ``score``, ``length``, ``epsilon``, ``loss``);
- ``eval.csv``: a row per evaluation and seed (every ``eval_every`` agent
  steps and at the end: ``eval_episodes`` games at ``eval_epsilon``);
- a progress line per chunk: agent steps of one seed, agent steps per
  second over all seeds, the mean score of the last 100 games across seeds
  and its spread;
- TensorBoard scalars per seed and their mean (with ``tensorboardX``);
- at the end ``model-seed{N}.keras`` for each seed, ``summary.json`` with
  every seed's final evaluation, and ``learning_curve.png`` with every seed
  and their mean.

Checkpoints hold every seed's whole run state. On gymnax that includes the
environments and the replay: ``--resume`` continues such a run exactly
(``--checkpoint STEP`` picks one). Atari and gymnasium environments live on
the host: a resume starts new games, and the replay is kept only with
``--save-replay`` (7.1 KB per Atari transition); without it a resume refills
the replay for ``learning_starts`` agent steps before the updates go on.
SIGINT or SIGTERM checkpoints before stopping. A NaN loss stops the run and
keeps the last checkpoint.
"""

import csv
import dataclasses
import json
import math
import os
import time
from typing import Any, TextIO

import jax
import numpy as np

from fdqn import checkpoint, jax_envs, networks, reporting, rundir
from fdqn.compiled import make_run
from fdqn.config import Config

METRIC_FIELDS = ["step", "seed", "episode", "score", "length", "epsilon", "loss"]
EVAL_FIELDS = ["step", "seed", "episodes", "mean", "median", "std", "min", "max"]


LAYOUT_FILE = "layout.json"  # the process count of a compiled run: its resume needs the same


def ran_compiled(config: Config, run_dir: str) -> bool:
    """Whether ``config`` trains (or trained, in ``run_dir``) with the compiled loop."""
    return (
        config.loop == "compiled"
        or config.num_seeds > 1
        or config.devices > 1
        or jax_envs.is_minatar(config.env)
        or os.path.exists(os.path.join(run_dir, LAYOUT_FILE))
    )


@dataclasses.dataclass
class SeedsResult:
    status: str  # "finished", "interrupted" or "diverged"
    agent_steps: int
    seeds: list[int]
    final_eval: list[float] | None  # mean score of each seed's final evaluation


def train_seeds(
    config: Config,
    run_dir: str,
    stream: TextIO,
    stops: Any = (),
    resume: bool = False,
    checkpoint_step: int | None = None,
    cpu_layers: bool = False,
    mesh: Any = None,
    writer: bool = True,
) -> SeedsResult:
    """Trains ``config.num_seeds`` agents (seeds ``seed, seed+1, ...``) in one program.

    Checkpoints (every ``checkpoint_every`` agent steps, at a stop and at the
    end) hold the whole :class:`fdqn.compiled.RunState` of every seed, the
    environments' states included, so ``resume`` continues the run exactly:
    the same steps give the same bits as a run straight through. Atari and
    gymnasium environments keep their games on the host: a resumed
    run starts new ones (:meth:`fdqn.compiled.CompiledRun.restart_envs`).
    ``cpu_layers`` and ``mesh`` (several devices) are :func:`fdqn.compiled.make_run`'s.

    Under ``jax.distributed`` every process calls this with the same
    arguments; one, the ``writer``, writes the run directory, while the
    others compute their share and wait for it at each checkpoint. A stop
    asked of any process stops them all at the same chunk.
    """
    run = make_run(config, cpu_layers=cpu_layers, mesh=mesh)
    if not writer:
        stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the run)
    seeds = [config.seed + i for i in range(config.num_seeds)]
    n = config.num_envs
    state = run.init(seeds)
    total = run.steps_for(config.total_steps)
    # chunks end on every log line, evaluation and checkpoint: one compiled length
    chunk = max(
        1,
        math.gcd(config.log_every, config.eval_every or config.log_every,
                 config.checkpoint_every or config.log_every) // n,
    )  # fmt: skip
    counts = {"episodes": [0] * len(seeds), "evaluations": 0, "checkpoints": 0}
    if resume and not writer:  # the writer picked the checkpoint (and set damaged ones aside)
        checkpoint_step = _broadcast(-1)
        checkpoint_step = None if checkpoint_step < 0 else checkpoint_step
    if resume and (checkpoint_step is not None or checkpoint.list_checkpoints(run_dir)):
        path, (state, counts), skipped = checkpoint.restore_newest(
            run_dir, lambda p: _restore(p, state, len(seeds)), step=checkpoint_step
        )
        if writer:
            _broadcast(checkpoint.step_of(path))
        state = run.place(state)
        for damaged, reason in skipped:
            moved = checkpoint.set_aside(damaged)
            stream.write(f"warning: damaged checkpoint {damaged} set aside as {moved}: {reason}\n")
        if not run.exact_resume:
            state = run.restart_envs(state)
        stream.write(
            f"resumed from {path}"
            + ("" if run.exact_resume else " (the environments start new games)")
            + "\n"
        )
        if not counts.pop("replay"):
            run = run.refilling(_fetch(state.counters))
            stream.write(
                f"the replay was not saved: it refills until agent step {run.learning_from:,}, "
                f"where the updates resume (--save-replay keeps it in checkpoints)\n"
            )
    elif resume:
        if writer:
            _broadcast(-1)
        stream.write(f"{run_dir} has no checkpoint yet: starting the run from step 0\n")
    done_steps = int(_fetch(state.counters.agent_steps)[0]) // n
    step = start_step = done_steps * n
    if resume and done_steps >= total:  # nothing to do: leave the run as it is
        stream.write(
            f"{run_dir} is at agent step {step:,} of --total-steps {config.total_steps:,}: "
            f"nothing to train (a larger --total-steps continues it)\n"
        )
        if not writer:
            stream.close()
        return SeedsResult("finished", step, seeds, None)
    for name in ("metrics.csv", "eval.csv") if writer else ():
        dropped = reporting.truncate_csv(os.path.join(run_dir, name), step)
        if dropped:
            stream.write(f"warning: dropped {dropped} unreadable line(s) of {name}\n")
    episodes, evaluations = counts["episodes"], counts["evaluations"]
    recent = _recent_scores(os.path.join(run_dir, "metrics.csv"), seeds)
    tb = reporting._tensorboard(os.path.join(run_dir, "tb")) if writer else None
    status = "finished"
    final = None
    start = time.perf_counter()

    saved_at = [start_step if resume else -1]

    # gymnax runs resume exactly, so their replay is always kept; Atari and gymnasium
    # runs (new games on a resume anyway) keep it with --save-replay (7.1 KB per Atari
    # transition), else a resume refills it
    keep_replay = config.save_replay or run.exact_resume

    def save() -> str:
        saved_at[0] = step
        counts.update(episodes=episodes, evaluations=evaluations)
        meta = {"num_seeds": len(seeds), **counts, "replay": keep_replay}
        kept = state if keep_replay else state._replace(replay=None)
        arrays = checkpoint.tree_to_arrays("run", _fetch(kept))  # every process takes part
        path = checkpoint.path_of(run_dir, step)
        if writer:
            path = checkpoint.save(run_dir, step, arrays, meta, keep=config.keep_checkpoints)
        _barrier(f"checkpoint {step}")  # the others go on once it is written
        return path

    with (
        _Csv(os.path.join(run_dir, "metrics.csv") if writer else None, METRIC_FIELDS) as rows,
        _Csv(os.path.join(run_dir, "eval.csv") if writer else None, EVAL_FIELDS) as eval_rows,
    ):
        while done_steps < total:
            if _any_process(bool(stops)):
                status = "interrupted"
                path = save()
                name = stops.name() if hasattr(stops, "name") else "stopped"
                stream.write(
                    f"{name} at agent step {step:,}: checkpoint {path}; "
                    f"continue with: python -m fdqn.train --resume {run_dir}\n"
                )
                break
            steps = min(chunk, total - done_steps)
            state, metrics = run.run(state, steps)
            metrics = _fetch(metrics)
            done_steps += steps
            step = done_steps * n
            loss = np.asarray(metrics.learner["loss"])  # (S, steps); NaN before the first update
            if np.any(~np.isfinite(loss) & (np.asarray(metrics.updates) > 0)):
                status = "diverged"
                stream.write(f"the loss became non-finite by agent step {step:,}\n")
                break
            _write_episodes(rows, metrics, seeds, episodes, recent, tb)
            rate = len(seeds) * (step - start_step) / (time.perf_counter() - start)
            means = [np.mean(r[-100:]) if r else math.nan for r in recent]
            stream.write(_progress(step, config.total_steps, rate, means, metrics, loss) + "\n")
            stream.flush()
            final = None
            if config.eval_every and step // config.eval_every > evaluations:
                evaluations = step // config.eval_every
                final = _evaluate(
                    run, state, config, seeds, step, evaluations, eval_rows, tb, stream
                )
            if config.checkpoint_every and step // config.checkpoint_every > counts["checkpoints"]:
                counts["checkpoints"] = step // config.checkpoint_every
                save()
        if status == "finished" and step != saved_at[0]:
            save()
        if status != "finished":
            final = None
        elif final is None:  # the final policy, unless evaluated at this very step
            final = _evaluate(
                run, state, config, seeds, step, evaluations + 1, eval_rows, tb, stream
            )
    if tb:
        tb.close()
    params = _fetch(state.learner.params)
    result = SeedsResult(status, done_steps * n, seeds, final)
    if not writer:
        stream.close()
        return result
    for i, seed in enumerate(seeds):
        mine = jax.tree.map(lambda x, i=i: x[i], params)
        networks.save_model(run.model, mine, os.path.join(run_dir, f"model-seed{seed}.keras"))
    rundir.atomic_write(
        os.path.join(run_dir, "summary.json"),
        lambda f: json.dump(dataclasses.asdict(result), f, indent=2),
    )
    plot_seeds(run_dir, f"fdqn DQN on {config.env}, {len(seeds)} seeds")
    return result


# -- many processes: each call below is collective (every process makes it, in order) ---


def _fetch(tree: Any) -> Any:
    """``tree`` as numpy arrays on this host (PRNG keys as keys), shards on other processes
    gathered."""

    def is_key(x):
        return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)

    if jax.process_count() == 1:
        return jax.tree.map(lambda x: x if is_key(x) else np.asarray(x), tree)
    from jax.experimental import multihost_utils

    keys = jax.tree.map(is_key, tree)  # the gather moves numbers: keys go as their key data
    plain = jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)
    gathered = multihost_utils.process_allgather(plain, tiled=True)
    return jax.tree.map(
        lambda x, key: jax.random.wrap_key_data(x) if key else np.asarray(x), gathered, keys
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fdqn {name}")


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def _broadcast(value: int) -> int:
    """The writer's ``value`` on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def _write_episodes(rows, metrics, seeds, episodes, recent, tb) -> None:
    done = np.asarray(metrics.done)  # (S, steps, N)
    returns, lengths = np.asarray(metrics.episode_return), np.asarray(metrics.episode_length)
    steps, epsilon = np.asarray(metrics.agent_steps), np.asarray(metrics.epsilon)
    loss = np.asarray(metrics.learner["loss"])
    for i, seed in enumerate(seeds):
        for t, e in zip(*np.nonzero(done[i])):
            episodes[i] += 1
            score = float(returns[i, t, e])
            recent[i].append(score)
            rows.write([int(steps[i, t]), seed, episodes[i], score, int(lengths[i, t, e]),
                        round(float(epsilon[i, t]), 6), _number(loss[i, t])])  # fmt: skip
            if tb:
                tb.add_scalar(f"seed{seed}/score", score, int(steps[i, t]))
        del recent[i][:-100]
    if tb and all(recent):
        tb.add_scalar(
            "all/mean_score", float(np.mean([np.mean(r) for r in recent])), int(steps[0, -1])
        )


def _number(x) -> Any:
    return "" if not np.isfinite(x) else float(x)


def _progress(step, total, rate, means, metrics, loss) -> str:
    finite = [m for m in means if np.isfinite(m)]
    score = (
        f"score(100) {np.mean(finite):.1f} (seeds {min(finite):.0f}-{max(finite):.0f})"
        if finite
        else "score(100) -"
    )
    last = loss[:, -1]
    loss_text = f"{np.nanmean(last):.4g}" if np.any(np.isfinite(last)) else "-"
    epsilon = float(np.asarray(metrics.epsilon)[0, -1])
    return (
        f"{min(step, total):,}/{total:,} steps per seed | {rate:,.0f} steps/s (all seeds) | "
        f"{score} | eps {epsilon:.3f} | loss {loss_text}"
    )


def _evaluate(run, state, config, seeds, step, index, rows, tb, stream) -> list[float]:
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1_000_003 * index))(
        np.asarray(seeds)
    )
    scores = _fetch(
        run.evaluate(state.learner.params, keys, config.eval_episodes, config.eval_epsilon)
    )
    for seed, s in zip(seeds, scores):
        rows.write([step, seed, len(s), float(s.mean()), float(np.median(s)), float(s.std()),
                    float(s.min()), float(s.max())])  # fmt: skip
        if tb:
            tb.add_scalar(f"seed{seed}/eval_mean", float(s.mean()), step)
    means = scores.mean(axis=1)
    stream.write(
        f"eval at step {step:,}: mean over seeds {means.mean():.1f} "
        f"(seeds {means.min():.1f}-{means.max():.1f}) over {scores.shape[1]} games each\n"
    )
    return [float(m) for m in means]


def _restore(path: str, template: Any, num_seeds: int) -> tuple[Any, dict]:
    """The state and counts of a checkpoint; a checkpoint without the replay gets the
    template's (empty) one, and ``counts["replay"]`` False."""
    arrays, meta = checkpoint.load(path)
    has_replay = meta.get("replay", True)  # checkpoints before 2026-12-04 always held it
    if not isinstance(has_replay, bool):
        raise checkpoint.CheckpointError(f"{path}/meta.json: replay must be true or false")
    if checkpoint.require(meta, "num_seeds", int, path) != num_seeds:
        raise checkpoint.CheckpointError(f"{path} holds {meta['num_seeds']} seeds, not {num_seeds}")
    episodes = checkpoint.require(meta, "episodes", list, path)
    if len(episodes) != num_seeds or not all(isinstance(e, int) and e >= 0 for e in episodes):
        raise checkpoint.CheckpointError(f"{path}/meta.json: episodes must be {num_seeds} counts")
    counts = {
        "episodes": episodes,
        "evaluations": checkpoint.require(meta, "evaluations", int, path),
        "checkpoints": checkpoint.require(meta, "checkpoints", int, path),
        "replay": has_replay,
    }
    if has_replay:
        state = checkpoint.arrays_to_tree("run", arrays, template)
    else:
        state = checkpoint.arrays_to_tree("run", arrays, template._replace(replay=None))
        state = state._replace(replay=template.replay)
    if int(np.asarray(state.counters.agent_steps)[0]) != meta["step"]:
        raise checkpoint.CheckpointError(f"{path}: its state is not at step {meta['step']}")
    return state, counts


def _recent_scores(path: str, seeds: list[int]) -> list[list[float]]:
    """The last 100 scores of each seed in ``metrics.csv`` (for the progress line)."""
    rows = reporting.read_csv(path)
    if not rows:
        return [[] for _ in seeds]
    return [rows["score"][rows["seed"] == seed][-100:].tolist() for seed in seeds]


class _Csv:
    """Appends rows to a CSV file, writing its header when the file is new."""

    def __init__(self, path: str | None, fields: list[str]):
        """``path`` None: rows go nowhere (a process other than the writer)."""
        if path is None:
            path = os.devnull
        new = path != os.devnull and (not os.path.exists(path) or os.path.getsize(path) == 0)
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(fields)

    def write(self, row: list) -> None:
        self._writer.writerow(row)

    def __enter__(self) -> "_Csv":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def plot_seeds(run_dir: str, title: str, smooth: int = 20) -> str | None:
    """``learning_curve.png``: each seed's smoothed scores, their mean, and evaluations."""
    figure = reporting.new_figure()
    if figure is None:
        return None
    fig, ax = figure
    episodes = reporting.read_csv(os.path.join(run_dir, "metrics.csv"))
    evals = reporting.read_csv(os.path.join(run_dir, "eval.csv"))
    grid = None
    curves = []
    if episodes:
        last = episodes["step"].max()
        grid = np.linspace(0, last, 200)
        for seed in np.unique(episodes["seed"]):
            mine = episodes["seed"] == seed
            steps, scores = episodes["step"][mine], episodes["score"][mine]
            k = min(smooth, len(scores))
            if k < 1:
                continue
            smoothed = np.convolve(scores, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smoothed, color="0.7", linewidth=0.8)
            curves.append(np.interp(grid, steps[k - 1 :], smoothed, left=np.nan))
    if curves:
        stacked = np.array(curves)
        seen = np.isfinite(stacked)
        mean = np.where(seen, stacked, 0).sum(0) / np.maximum(seen.sum(0), 1)
        mean[~seen.any(0)] = np.nan  # before any seed's first smoothed point
        ax.plot(grid, mean, color="C0", linewidth=2,
                label=f"mean of {len(curves)} seeds (each grey: last {smooth} games)")  # fmt: skip
    if evals:
        steps = np.unique(evals["step"])
        means = [evals["mean"][evals["step"] == s].mean() for s in steps]
        ax.plot(steps, means, "o-", color="C3", label="evaluation, mean over seeds")
    return reporting.save_figure(
        fig, ax, run_dir, title, "agent steps (per seed)", legend=bool(curves or evals)
    )
