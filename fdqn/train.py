"""The training program: ``python -m fdqn.train [--preset NAME] [--flag value ...]``.

With no flags it trains DQN on Breakout with the Nature recipe (see
:mod:`fdqn.config`). A run writes to its run directory (``--run-dir``,
default ``runs/<preset>-<env>-seed<seed>-<time>``):

- ``config.json``: the resolved configuration;
- ``metrics.csv``, ``eval.csv``, ``tb/``: see :mod:`fdqn.reporting`;
- ``checkpoints/step-N/``: everything needed to resume (see :func:`train`),
  and the Q-network as a Keras model file, ``model.keras``;
- ``model.keras`` (the trained Q-network, loadable with
  ``keras.saving.load_model`` without fdqn), ``learning_curve.png`` and
  ``summary.json`` at the end.

On a CPU-only machine (no GPU or TPU plugin of JAX installed) the program
applies :mod:`fdqn.cpu`'s tuning by default and says so in its first line:
``--no-cpu-tuning`` turns it off.

Faults leave the run directory usable:

- One process at a time holds a run directory (an OS lock on
  ``RUN_DIR/.lock`` that dies with the process); a second is refused with
  the holder's pid.
- Every file is written atomically (temporary name, ``fsync``, rename), so
  ``kill -9`` or a full disk never leaves a half-written file in place;
  what a killed writer left unpublished is removed at the next start.
- ``--resume RUN_DIR`` continues from the newest intact checkpoint: a
  damaged newer one is moved to ``checkpoints/set-aside/`` with a warning,
  never deleted; ``--checkpoint STEP`` picks one (newer ones are set aside
  too). A run that died before its first checkpoint starts again from step
  0. ``--total-steps`` and ``--log-every`` may change on resume, and are
  saved with the run.
- SIGINT (Ctrl-C) and SIGTERM (what schedulers send before killing) write
  a checkpoint, print the command that continues the run and exit 130 and
  143; one before training starts, or a second one, stops at once with
  one line. A NaN or infinite loss stops the run (exit 3) and keeps the
  last good checkpoint.
- Errors (bad flags or values, an unusable run directory, a damaged run, a
  full disk, too little memory) print one line on stderr and exit 2;
  bad input is refused before anything is written.
"""

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from fdqn import checkpoint, cpu, envs, jax_envs, networks, parallel, reporting, rundir, seed_runs
from fdqn.config import (
    CONFIG_FILE,
    PRESETS,
    Config,
    epsilon_schedule,
    load_config,
    loss_options,
    make_env,
    make_network,
    preset,
    save_config,
)
from fdqn.evaluate import evaluate
from fdqn.learner import TrainState, create_train_state, make_optimizer, sync_target, update
from fdqn.replay import ReplayMemory
from fdqn.rollout import Rollout

EXIT_USAGE = 2
EXIT_NAN = 3
MODEL_FILE = "model.keras"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A SIGINT or SIGTERM that could not wait: during startup, or a second one.

    A ``BaseException``, as ``KeyboardInterrupt``: code that handles errors
    lets it through, and what it interrupts cleans up on the way (a
    checkpoint being written is dropped; older ones are untouched).
    """

    def __init__(self, signum: int, during: str):
        super().__init__(f"{signal.Signals(signum).name} {during}")
        self.signum = signum
        self.during = during


class StopRequests:
    """SIGINT and SIGTERM handling of a run: a signal handler and what it received.

    While ``accepting`` (the training loop), the first signal is a request:
    the loop writes a checkpoint at the end of the agent step it is in and
    returns. Any other signal raises :class:`Stopped` where the program is:
    one before training starts, or a second one while the first is served.
    Truthy once a signal has been received.
    """

    def __init__(self):
        self.received: list[int] = []
        self.accepting = False
        self.started = False  # whether the training loop has begun

    def __call__(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self.accepting and len(self.received) == 1:
            return
        if len(self.received) > 1:
            during = "a second time"
        elif not self.started:
            during = "before training started"
        else:
            during = "while the run was finishing (its last checkpoint is written)"
        raise Stopped(signum, during)

    def __bool__(self) -> bool:
        return bool(self.received)

    def name(self) -> str:
        return signal.Signals(self.received[0]).name if self.received else ""

    @contextlib.contextmanager
    def installed(self):
        """Makes this object the SIGINT and SIGTERM handler for a block (main thread only)."""
        previous = {s: signal.signal(s, self) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# -- building a run -------------------------------------------------------------


@dataclasses.dataclass
class Counters:
    """Host-side progress of a run (agent steps live in the rollout)."""

    episodes: int = 0
    updates: int = 0
    updates_skipped: int = 0  # owed while a resumed run refilled its replay memory
    target_syncs: int = 0
    evaluations: int = 0
    checkpoints: int = 0


@dataclasses.dataclass
class Run:
    config: Config
    model: Any  # the stock Keras network, which model files are written from
    state: TrainState
    memory: ReplayMemory
    rollout: Rollout
    counters: Counters
    refill_until: int = 0  # no updates before this agent step (resumed without replay)
    metrics: Any = None  # of the latest update


def build(config: Config, cpu_layers: bool = False) -> Run:
    """Environments, network, learner state, replay memory and rollout for ``config``.

    ``cpu_layers`` computes the network through :func:`fdqn.cpu.cpu_model`
    (same parameters; model files are still written from the stock network).
    """
    env = make_env(config)
    model = make_network(config, env, seed=config.seed)
    optimizer = make_optimizer(
        config.optimizer, config.lr, clip=config.clip, max_grad_norm=config.max_grad_norm
    )
    computed = cpu.cpu_model(model) if cpu_layers else model
    state = create_train_state(computed, optimizer, jax.random.key(config.seed))
    obs_space = env.single_observation_space
    atari = envs.is_atari(config.env)
    memory = ReplayMemory(
        config.buffer_size,
        config.num_envs,
        obs_space.shape,
        np.uint8 if atari else np.float32,
        frame_stack=obs_space.shape[0] if atari else None,
        seed=config.seed,
        prefault=config.prefault_replay,
    )
    rollout = Rollout(
        env,
        state.q_fn,
        memory,
        seed=config.seed,
        terminal_on_life_loss=config.terminal_on_life_loss,
    )
    return Run(config, model, state, memory, rollout, Counters())


# -- checkpoints ----------------------------------------------------------------


def save_checkpoint(run: Run, run_dir: str) -> str:
    state = run.state
    arrays = {
        **checkpoint.tree_to_arrays("params", state.params),
        **checkpoint.tree_to_arrays("target_params", state.target_params),
        **checkpoint.tree_to_arrays("opt_state", state.opt_state),
        **checkpoint.tree_to_arrays("key", state.key),
        **checkpoint.tree_to_arrays("step", state.step),
    }
    rollout_arrays, rollout_data = run.rollout.state_dict()
    arrays.update(rollout_arrays)
    env_state = envs.get_state(run.rollout.env)
    meta = {
        "counters": dataclasses.asdict(run.counters),
        "rollout": rollout_data,
        "env_state": env_state,
        "has_replay": run.config.save_replay,
    }
    extra = {MODEL_FILE: lambda path: networks.save_model(run.model, state.params, path)}
    if run.config.save_replay:
        extra["replay.npz"] = run.memory.save
    return checkpoint.save(
        run_dir, run.rollout.agent_steps, arrays, meta, extra, keep=run.config.keep_checkpoints
    )


def restore_checkpoint(run: Run, path: str) -> list[str]:
    """Loads a checkpoint into a freshly built run; returns notes on what could not be.

    Everything is read and checked before the run changes: a damaged
    checkpoint raises :class:`fdqn.checkpoint.CheckpointError` and leaves the
    learner state, counters and replay memory as they were.
    """
    arrays, meta = checkpoint.load(path)
    step = meta["step"]
    counters = checkpoint.require(meta, "counters", dict, path)
    names = {f.name for f in dataclasses.fields(Counters)}
    if set(counters) != names:
        raise checkpoint.CheckpointError(
            f"{path}/meta.json: counters must have exactly {', '.join(sorted(names))}"
        )
    for name in sorted(names):
        checkpoint.require(counters, name, int, f"{path}/meta.json counters")
    rollout_data = checkpoint.require(meta, "rollout", dict, path)
    if checkpoint.require(rollout_data, "agent_steps", int, f"{path} rollout") != step:
        raise checkpoint.CheckpointError(f"{path}/meta.json: rollout agent_steps is not {step}")
    checkpoint.require(rollout_data, "rng", dict, f"{path} rollout")
    has_replay = checkpoint.require(meta, "has_replay", bool, path)
    env_state = meta.get("env_state")
    if env_state is not None and not isinstance(env_state, dict):
        raise checkpoint.CheckpointError(f"{path}/meta.json: env_state must be an object or null")
    state = run.state
    restored_state = state.replace(
        params=checkpoint.arrays_to_tree("params", arrays, state.params),
        target_params=checkpoint.arrays_to_tree("target_params", arrays, state.target_params),
        opt_state=checkpoint.arrays_to_tree("opt_state", arrays, state.opt_state),
        key=checkpoint.arrays_to_tree("key", arrays, state.key),
        step=checkpoint.arrays_to_tree("step", arrays, state.step),
    )
    notes = []
    replay_path = os.path.join(path, "replay.npz")
    memory = None
    if has_replay and os.path.exists(replay_path):
        try:
            memory = ReplayMemory.load(replay_path)
        except (ValueError, OSError) as e:
            raise checkpoint.CheckpointError(f"{replay_path}: {e}") from None
        if (memory.capacity, memory.num_envs, memory.obs_shape) != (
            run.memory.capacity,
            run.memory.num_envs,
            run.memory.obs_shape,
        ):
            raise checkpoint.CheckpointError(f"{replay_path} does not fit this run's replay memory")
    try:
        check_rng = np.random.default_rng()
        check_rng.bit_generator.state = rollout_data["rng"]
        run.rollout.load_state_dict(arrays, rollout_data)
    except (KeyError, ValueError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{path}: rollout state does not fit ({e})") from None
    if memory is not None:
        run.memory = memory
        run.rollout.memory = memory
    refills_from = "was not saved" if not has_replay else f"file {replay_path} is missing"
    if memory is None:
        run.refill_until = step + run.config.learning_starts
        notes.append(
            f"replay memory {refills_from}: it refills until agent step {run.refill_until:,} "
            f"before updates resume"
        )
    restarted = env_state is None or memory is None
    if not restarted:
        try:
            envs.set_state(run.rollout.env, env_state)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise checkpoint.CheckpointError(
                f"{path}: environment state does not fit ({e})"
            ) from None
    else:
        # Without the replay memory or the emulator's state the old episodes
        # cannot go on: start new games at this point.
        run.rollout.restart(seed=run.config.seed + step)
        notes.append("environments restarted with new games")
    run.state = restored_state
    run.counters = Counters(**counters)
    return notes


# -- the loop -------------------------------------------------------------------


def _fetch(metrics: dict[str, jax.Array], step: int) -> dict[str, float]:
    values = {k: float(v) for k, v in metrics.items()}
    if not math.isfinite(values["loss"]):
        raise NonFiniteLoss(f"the loss became {values['loss']} by agent step {step:,}")
    return values


def train(
    config: Config,
    run_dir: str,
    resume: bool = False,
    stream: Any = None,
    stop_at: int | None = None,
    run: Run | None = None,
    checkpoint_step: int | None = None,
    stops: "StopRequests | None" = None,
) -> dict[str, Any]:
    """Runs (or resumes) training; returns a summary.

    Checkpoints hold the online and target parameters, optimizer state, PRNG
    keys, step and episode counters (and so the epsilon position), the
    rollout's state, the environments' state where they expose it (classic
    control), and, with ``save_replay``, the replay memory. Resuming with all
    of these gives the same parameters as training straight through.

    The caller holds the run directory (``python -m fdqn.train`` takes its
    :class:`fdqn.rundir.RunLock` and tidies it with
    :func:`fdqn.checkpoint.recover` first).

    Args:
      config: a validated config.
      run_dir: the run directory (created by the caller).
      resume: continue from the newest intact checkpoint in ``run_dir`` (a
        damaged newer one is skipped with a warning, never deleted); a run
        with no checkpoint yet starts again from step 0. A ``config`` that
        differs from the saved one (a new ``total_steps``) replaces it.
      stream: where progress goes (stderr by default).
      stop_at: stop (with a checkpoint) at this agent step, short of
        ``total_steps``; for tests of resumption.
      run: what ``build(config)`` returned, if the caller built it already.
      checkpoint_step: resume from this checkpoint, not the newest.
      stops: the SIGINT/SIGTERM handling to use; by default one is installed
        for the call (main thread only).
    """
    run = run if run is not None else build(config)
    out = stream or sys.stderr
    restored_step = None
    if resume:
        if checkpoint_step is None and not checkpoint.list_checkpoints(run_dir):
            out.write(
                f"{run_dir} has no checkpoint yet: starting the run from step 0 "
                f"with its saved config\n"
            )
        else:
            path, notes, skipped = checkpoint.restore_newest(
                run_dir, lambda p: restore_checkpoint(run, p), step=checkpoint_step
            )
            restored_step = run.rollout.agent_steps
        for name in ("metrics.csv", "eval.csv"):
            dropped = reporting.truncate_csv(os.path.join(run_dir, name), run.rollout.agent_steps)
            if dropped:
                out.write(f"warning: dropped {dropped} unreadable line(s) of {name}\n")
        if restored_step is not None:
            # the run goes on from `path`: what is newer leaves the list, kept as it is
            for damaged, reason in skipped:
                moved = checkpoint.set_aside(damaged)
                out.write(f"warning: damaged checkpoint {damaged} set aside as {moved}: {reason}\n")
            for newer in checkpoint.list_checkpoints(run_dir):
                if checkpoint.step_of(newer) > restored_step:
                    out.write(f"set aside {newer}, newer than the chosen checkpoint, as "
                              f"{checkpoint.set_aside(newer)}\n")  # fmt: skip
            out.write(f"resumed from {path}" + "".join(f"; {n}" for n in notes) + "\n")
        if _saved_config(run_dir) != config:  # the overrides of this resume are part of the run
            save_config(config, run_dir)
    reporter = reporting.Reporter(
        run_dir,
        config.total_steps,
        config.log_every,
        out,
        start_step=run.rollout.agent_steps,
        learning_starts=max(config.learning_starts, run.refill_until),
    )
    schedule = epsilon_schedule(config)
    own_stops = stops is None
    stops = StopRequests() if own_stops else stops
    limit = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    status = "finished"
    try:
        with stops.installed() if own_stops else contextlib.nullcontext():
            stops.accepting = stops.started = True
            status = run_until(run, run_dir, reporter, schedule, limit, stops)
            if run.rollout.agent_steps == restored_step:  # nothing new: the checkpoint stands
                reporter.message(
                    f"{run_dir} is at agent step {restored_step:,} of --total-steps "
                    f"{config.total_steps:,}: nothing to train (a larger --total-steps "
                    f"continues it)"
                )
            elif status == "finished":
                _checkpoint_if_finite(run, run_dir, run.metrics)
            newest = checkpoint.latest_checkpoint(run_dir)
            if newest is not None and run.rollout.agent_steps != restored_step:
                # the run's network as it stands: the newest checkpoint's copy
                source = os.path.join(newest, MODEL_FILE)
                rundir.atomic_write_path(
                    os.path.join(run_dir, MODEL_FILE), lambda tmp: shutil.copyfile(source, tmp)
                )
    finally:
        stops.accepting = False
        reporter.close()
        run.rollout.env.close()
    summary = {
        "status": status,
        "agent_steps": run.rollout.agent_steps,
        "updates": run.counters.updates,
        "episodes": run.counters.episodes,
        "mean_score_last_100": float(np.mean(reporter.scores)) if reporter.scores else None,
        "checkpoint": checkpoint.latest_checkpoint(run_dir),
        "state": run.state,
    }
    summary["learning_curve"] = reporting.plot_learning_curve(run_dir, f"fdqn DQN on {config.env}")
    if status == "finished":
        rundir.atomic_write(
            os.path.join(run_dir, "summary.json"),
            lambda f: json.dump({k: v for k, v in summary.items() if k != "state"}, f, indent=2),
        )
    return summary


def _saved_config(run_dir: str) -> Config | None:
    try:
        return load_config(run_dir)
    except ValueError:  # none saved (a run driven from Python), or unreadable
        return None


def run_until(run: Run, run_dir: str, reporter, schedule, limit: int, stops: Any = ()) -> str:
    """Plays and learns until agent step ``limit`` (or the config's episode limit).

    Acts, stores, updates, syncs the target, reports, evaluates and writes
    the periodic checkpoints the config asks for; the final checkpoint is the
    caller's. Returns ``"finished"``, or ``"interrupted"`` (after writing a
    checkpoint) once ``stops`` (a :class:`StopRequests`) has received a
    signal. Calling it again with a larger ``limit`` continues the same run.
    """
    config, counters, rollout, memory = run.config, run.counters, run.rollout, run.memory
    loss_kwargs = loss_options(config)
    metrics = run.metrics
    while rollout.agent_steps < limit and not (
        config.total_episodes and counters.episodes >= config.total_episodes
    ):
        if stops:
            path = _checkpoint_if_finite(run, run_dir, metrics)
            reporter.message(
                f"{stops.name()} at agent step {rollout.agent_steps:,}: checkpoint {path}; "
                f"continue with: python -m fdqn.train --resume {run_dir}"
            )
            return "interrupted"
        epsilon = float(schedule(rollout.agent_steps))
        step = rollout.agent_steps + rollout.num_envs  # the count once this step is taken
        learning = step >= config.learning_starts

        # The batches of this step's updates are drawn before acting: the memory
        # does not change until the step ends, so they are the batches the
        # updates would draw later, and gathering them overlaps the previous
        # updates, which acting waits for.
        batches = [
            memory.sample(config.batch_size)
            for _ in range(_updates_due(run, step) if learning else 0)
        ]

        def learn(batches=batches):
            """This step's updates; they run while the environments step."""
            for batch in batches:
                run.state, run.metrics = update(run.state, batch, **loss_kwargs)
                counters.updates += 1

        # acting uses the parameters of the updates so far; this step's updates
        # sample the transitions of the steps before it
        scores, lengths = rollout.step(run.state.params, epsilon, learn if batches else None)
        metrics = run.metrics
        if (
            learning
            and len(memory) >= config.batch_size
            and config.target_update_unit == "steps"
            and step // config.target_update > counters.target_syncs
        ):
            run.state = sync_target(run.state, config.tau)
            counters.target_syncs = step // config.target_update

        if len(scores) and metrics is not None:
            reporter.learner = _fetch(metrics, step)
        for score, length in zip(scores, lengths):
            counters.episodes += 1
            reporter.episode(step, counters.episodes, float(score), int(length), epsilon)
            if config.print_episodes:
                reporter.message(
                    f"Episode {counters.episodes - 1} achieved score {score:g} "
                    f"at {step} training steps"
                )
            if (
                config.target_update_unit == "episodes"
                and (counters.episodes - 1) % config.target_update == 0
            ):
                run.state = sync_target(run.state, config.tau)
                counters.target_syncs += 1

        if metrics is not None and reporter.due_for_log(step):
            reporter.progress(step, epsilon, _fetch(metrics, step))
        else:
            reporter.progress(step, epsilon)

        if config.eval_every and step // config.eval_every > counters.evaluations:
            counters.evaluations = step // config.eval_every
            scores = evaluate(
                run.state.q_fn,
                run.state.params,
                config,
                config.eval_episodes,
                config.eval_epsilon,
                seed=config.seed + 1_000_003 * counters.evaluations,
            )
            reporter.evaluation(step, scores)
        if config.checkpoint_every and step // config.checkpoint_every > counters.checkpoints:
            counters.checkpoints = step // config.checkpoint_every
            _checkpoint_if_finite(run, run_dir, metrics)
    return "finished"


def _updates_due(run: Run, step: int) -> int:
    """How many updates are owed once agent step ``step`` is taken.

    Updates are due every ``train_every`` agent steps from ``learning_starts``
    on, once the memory holds a batch. While a resumed run refills its memory
    (up to ``run.refill_until``) the updates owed are skipped, not made up.
    """
    config, counters = run.config, run.counters
    if len(run.memory) < config.batch_size:
        return 0
    due = (step - config.learning_starts) // config.train_every + 1
    if step < run.refill_until:
        counters.updates_skipped = due - counters.updates
    return max(0, due - counters.updates - counters.updates_skipped)


def _checkpoint_if_finite(run: Run, run_dir: str, metrics) -> str:
    if metrics is not None:
        _fetch(metrics, run.rollout.agent_steps)  # never checkpoint a diverged learner
    return save_checkpoint(run, run_dir)


# -- command line ---------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(EXIT_USAGE, f"fdqn.train: error: {message} (see --help)\n")


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 64,64, got {text!r}") from None
    return widths


def make_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = _Parser(
        prog="python -m fdqn.train",
        description="Train DQN. Presets: "
        + "; ".join(f"{name}" for name in PRESETS)
        + " (see fdqn/config.py). Flags override the preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="preset (default: atari)"
    )
    parser.add_argument("--run-dir", default=None, help="run directory (default: under runs/)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its newest intact checkpoint (only --total-steps and "
        "--log-every may change; they are saved with the run)",
    )
    parser.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="with --resume: continue from the checkpoint of this agent step",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="many processes (jax.distributed): process 0's address; also read from "
        "FDQN_COORDINATOR",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes of the run, one per host (also read from FDQN_NUM_PROCESSES, "
        "SLURM_NTASKS, WORLD_SIZE; default 1)",
    )
    parser.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process's index; 0 writes the run directory (also read from "
        "FDQN_PROCESS_ID, SLURM_PROCID, RANK)",
    )
    parser.add_argument(
        "--coordinator-timeout",
        type=int,
        default=120,
        metavar="SECONDS",
        help="how long a process waits for the others to join",
    )
    parser.add_argument(
        "--cpu-tuning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply fdqn.cpu's XLA flag, malloc options and CPU layers (fdqn.cpu.cpu_model) "
        "(default: on when JAX has no GPU or TPU plugin installed)",
    )
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = field.metadata["help"]
        if field.type in (bool, "bool"):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})",
            )
            continue
        kind = {int: int, float: float, str: str}.get(type(default), _parse_hidden)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(
            flag,
            type=kind,
            default=argparse.SUPPRESS,
            metavar=field.name.upper(),
            help=f"{help_text} (default: {shown})",
        )
    return parser


def _default_run_dir(preset_name: str, config: Config) -> str:
    env = re.sub(r"[^A-Za-z0-9]+", "-", config.env).strip("-")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{preset_name}-{env}-seed{config.seed}-{stamp}")


RESUME_OVERRIDES = ("total_steps", "log_every")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status.

    0: finished; 2: an error, said in one line on stderr (bad input, a run
    directory in use or unusable, a damaged run, a full disk, too little
    memory); 3: the loss became NaN; 130 and 143: stopped by SIGINT and
    SIGTERM.
    """
    stops = StopRequests()
    with stops.installed():
        try:
            return _main(argv, stops)
        except Stopped as e:
            where = getattr(e, "run_dir", None)
            newest = checkpoint.latest_checkpoint(where) if where else None
            kept = f"; newest checkpoint: {newest}" if newest else ""
            print(f"fdqn.train: stopped by {e}{kept}", file=sys.stderr)
            return 128 + e.signum


def _error_line(e: BaseException) -> str | None:
    """The one-line message of an error the command line reports, or None for a bug."""
    if isinstance(e, ValueError):  # ConfigError, CheckpointError, RunDirError included
        return str(e)
    if isinstance(e, OSError):
        return rundir.os_error_line(e, "cannot write" if e.errno in _WRITE_ERRNOS else "")
    if isinstance(e, MemoryError):
        return "out of memory: lower --buffer-size, --batch-size, --num-envs or the network's size"
    if isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e):
        first = str(e).strip().splitlines()[0]
        return (
            f"out of memory on the JAX device ({first}): lower --batch-size, --num-envs "
            f"or the network's size"
        )
    return None


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _main(argv: list[str] | None, stops: StopRequests) -> int:
    parser = make_parser()
    args = vars(parser.parse_args(argv))
    preset_name = args.pop("preset")
    run_dir = args.pop("run_dir")
    resume_dir = args.pop("resume")
    checkpoint_step = args.pop("checkpoint")
    cpu_tuning = args.pop("cpu_tuning")
    cluster_flags = [args.pop(k) for k in ("coordinator", "num_processes", "process_id")]
    join_timeout = args.pop("coordinator_timeout")

    def fail(message: str) -> int:
        print(f"fdqn.train: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        cluster = parallel.cluster_from(*cluster_flags)
    except parallel.LayoutError as e:
        return fail(str(e))
    if join_timeout < 1:
        return fail(
            f"--coordinator-timeout must be a positive number of seconds, got {join_timeout}"
        )

    if resume_dir is not None:
        unexpected = sorted(set(args) - set(RESUME_OVERRIDES))
        flags = ["--" + n.replace("_", "-") for n in unexpected]
        flags += ["--run-dir"] if run_dir is not None else []
        flags += ["--preset"] if preset_name is not None else []
        if flags:
            return fail(f"--resume continues a run with its own config; drop {', '.join(flags)}")
    elif checkpoint_step is not None:
        return fail("--checkpoint picks the checkpoint --resume continues from; add --resume")
    if resume_dir is not None:
        try:  # before any process joins: a resume on another process count is refused
            _check_processes(resume_dir, cluster.num_processes)
        except ValueError as e:
            return fail(str(e))
    if "" in (run_dir, resume_dir):
        return fail(f"--{'run-dir' if run_dir == '' else 'resume'} must not be empty")
    if checkpoint_step is not None and checkpoint_step < 0:
        return fail(f"--checkpoint must be a step (a non-negative integer), got {checkpoint_step}")
    if cpu_tuning is None:
        cpu_tuning = not cpu.accelerator_installed()
    # before JAX computes anything (XLA reads its flags once); said once the flags are valid
    tuning = cpu.tune() if cpu_tuning else None
    preset_name = preset_name or "atari"
    if cluster.distributed:
        return _join_run(cluster, join_timeout, preset_name, args, run_dir, resume_dir,
                         checkpoint_step, cpu_tuning, tuning, stops, fail)  # fmt: skip
    return _main_after_join(preset_name, args, run_dir, resume_dir, checkpoint_step, cpu_tuning,
                            tuning, stops, fail)  # fmt: skip


def _main_after_join(preset_name, args, run_dir, resume_dir, checkpoint_step, cpu_tuning, tuning,
                     stops, fail) -> int:  # fmt: skip
    """The run of this process once its processes are joined: it locks the run directory."""
    try:
        if resume_dir is not None:
            config = load_config(resume_dir).replace(**args).validate()
            run_dir = resume_dir
        else:
            config = preset(preset_name).replace(**args).validate()
            run_dir = run_dir or _default_run_dir(preset_name, config)
            if os.path.isdir(run_dir) and rundir.visible_entries(run_dir):
                return fail(
                    f"run directory {run_dir} is not empty: continue it with --resume {run_dir} "
                    f"or choose another --run-dir"
                )
        created = not os.path.exists(run_dir)
        rundir.make_run_dir(run_dir)
    except ValueError as e:  # ConfigError and RunDirError included
        return fail(str(e))
    try:
        lock = rundir.RunLock(run_dir)
    except rundir.RunDirError as e:
        return fail(str(e))
    with lock:
        try:
            status = _run(
                config, run_dir, resume_dir is not None, checkpoint_step, cpu_tuning, tuning,
                stops,
            )  # fmt: skip
        except (Exception, Stopped) as e:
            started = os.path.exists(os.path.join(run_dir, CONFIG_FILE))
            if created and not started:  # nothing of this run is left behind
                with contextlib.suppress(OSError):
                    os.remove(lock.path)
                    os.rmdir(run_dir)
            if isinstance(e, Stopped):
                e.run_dir = run_dir
                raise
            line = _error_line(e)
            if line is None:
                raise
            newest = checkpoint.latest_checkpoint(run_dir) if started else None
            return fail(line + (f"; newest checkpoint: {newest}" if newest else ""))
    return status


def _run(config, run_dir, resume, checkpoint_step, cpu_tuning, tuning, stops) -> int:
    """Everything after the run directory is locked; errors go back to :func:`_main`."""
    if tuning is not None:
        print(
            f"fdqn.train: CPU tuning on ({tuning.describe()}; CPU layers); "
            f"--no-cpu-tuning turns it off",
            file=sys.stderr,
        )
    print(f"fdqn.train: {config.env}, run directory {run_dir}", file=sys.stderr)
    if resume:
        for line in checkpoint.recover(run_dir):
            print(f"fdqn.train: {line}", file=sys.stderr)
    else:
        if rundir.visible_entries(run_dir):  # filled by another process before the lock
            raise rundir.RunDirError(
                f"run directory {run_dir} is not empty: continue it with --resume {run_dir} "
                f"or choose another --run-dir"
            )
    if jax.process_count() > 1 or seed_runs.ran_compiled(config, run_dir):
        return _run_seeds(config, run_dir, resume, checkpoint_step, stops, cpu_tuning)
    # built before anything is written, so that a replay memory larger than the RAM
    # fails here; mapping the memory takes seconds per GiB on some machines
    run = build(config, cpu_layers=cpu_tuning)
    if not resume:
        save_config(config, run_dir)
    try:
        summary = train(
            config, run_dir, resume=resume, run=run, checkpoint_step=checkpoint_step, stops=stops
        )
    except NonFiniteLoss as e:
        last = checkpoint.latest_checkpoint(run_dir)
        print(
            f"fdqn.train: error: {e}; stopped, last good checkpoint: {last or 'none'}",
            file=sys.stderr,
        )
        return EXIT_NAN
    if summary["status"] == "interrupted":
        return 128 + stops.received[0]
    summary.pop("state")
    print(json.dumps(summary))
    return 0


def _join_run(cluster, join_timeout, preset_name, args, run_dir, resume_dir, checkpoint_step,
              cpu_tuning, tuning, stops, fail) -> int:  # fmt: skip
    """A run of many processes: process 0 as a run of one, the others beside it.

    Every process is started with the same flags. Process 0 holds and writes
    the run directory (shared by all: a network file system); the others
    write nothing, compute their devices' share and wait for it at the
    barriers. Only the compiled loop on gymnax environments runs so.
    """

    # everything a process can check alone is checked before joining: a process that
    # stops here leaves the others to the join's timeout, a one-line error, not a hang
    try:
        if resume_dir is not None:
            config = load_config(resume_dir).replace(**args).validate()
        else:
            config = preset(preset_name).replace(**args).validate()
            if run_dir is None:
                return fail(f"{cluster.num_processes} processes need --run-dir (shared by all)")
            if (
                cluster.process_id == 0
                and os.path.isdir(run_dir)
                and rundir.visible_entries(run_dir)
            ):
                return fail(f"run directory {run_dir} is not empty: continue it with --resume "
                            f"{run_dir} or choose another --run-dir")  # fmt: skip
        if not jax_envs.is_jax_env(config.env):
            raise ValueError(f"several processes run gymnax envs; {config.env} steps on the host")
        parallel.choose_layout(
            config.devices * cluster.num_processes, config.num_seeds, config.num_envs,
            config.batch_size, cluster.num_processes,
        )  # fmt: skip
    except ValueError as e:  # ConfigError and LayoutError included
        return fail(str(e))

    def give_up(message: str) -> None:  # the runtime would abort with a stack trace
        print(f"fdqn.train: error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_USAGE)

    try:
        parallel.initialize(cluster, join_timeout, on_timeout=give_up)
    except parallel.LayoutError as e:
        return fail(str(e))
    if cluster.process_id == 0:
        return _main_after_join(preset_name, args, run_dir, resume_dir, checkpoint_step,
                                cpu_tuning, tuning, stops, fail)  # fmt: skip
    seed_runs._barrier("run directory")  # process 0 has made, locked and recovered it
    try:
        return _run_seeds(config, resume_dir or run_dir, resume_dir is not None, checkpoint_step,
                          stops, cpu_tuning, writer=False)  # fmt: skip
    except ValueError as e:
        return fail(str(e))


def _run_seeds(
    config: Config,
    run_dir: str,
    resume: bool,
    checkpoint_step: int | None,
    stops: StopRequests,
    cpu_layers: bool,
    writer: bool = True,
) -> int:
    """The compiled loop: ``--num-seeds S`` seeds in one program (:mod:`fdqn.seed_runs`)."""
    mesh = None
    processes = jax.process_count()  # a gymnax env, checked before the processes joined
    if config.devices > 1 or processes > 1:  # the layout is checked before anything is written
        layout = parallel.choose_layout(
            config.devices * processes, config.num_seeds, config.num_envs, config.batch_size,
            processes,
        )  # fmt: skip
        mesh = parallel.make_mesh(layout, parallel.devices_per_process(config.devices))
        if writer:
            print(f"fdqn.train: {layout} devices ({processes} process(es)): "
                  f"{mesh.devices.flat[0].platform}", file=sys.stderr)  # fmt: skip
    if writer:
        if not resume or _saved_config(run_dir) != config:
            save_config(config, run_dir)
        if not resume:
            rundir.atomic_write(
                os.path.join(run_dir, LAYOUT_FILE),
                lambda f: json.dump({"processes": processes}, f),
            )
        if processes > 1:
            seed_runs._barrier("run directory")
    stops.accepting = stops.started = True
    result = seed_runs.train_seeds(
        config, run_dir, sys.stderr, stops, resume, checkpoint_step, cpu_layers=cpu_layers,
        mesh=mesh, writer=writer,
    )  # fmt: skip
    stops.accepting = False
    if result.status == "interrupted":
        return 128 + stops.received[0]
    if result.status == "diverged":
        last = checkpoint.latest_checkpoint(run_dir)
        print(f"fdqn.train: error: the loss became NaN or infinite; stopped, last good "
              f"checkpoint: {last or 'none'}", file=sys.stderr)  # fmt: skip
        return EXIT_NAN
    if writer:
        print(json.dumps(dataclasses.asdict(result)))
    return 0


LAYOUT_FILE = seed_runs.LAYOUT_FILE


def _check_processes(run_dir: str, processes: int) -> None:
    try:
        with open(os.path.join(run_dir, LAYOUT_FILE)) as f:
            saved = json.load(f)["processes"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = 1  # a run of one process (or from before the file)
    if saved != processes:
        raise ValueError(
            f"{run_dir} was trained by {saved} process(es); this run has {processes}: "
            f"resume it with --num-processes {saved}"
        )


if __name__ == "__main__":
    sys.exit(main())
