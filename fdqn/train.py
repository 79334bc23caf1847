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

``--resume RUN_DIR`` continues a run from its newest checkpoint. Ctrl-C
writes a checkpoint and exits; a NaN or infinite loss stops the run and
keeps the last good checkpoint. Bad flags or values print one line on
stderr and exit with status 2 before anything is written.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from fdqn import checkpoint, cpu, envs, networks, reporting
from fdqn.config import (
    PRESETS,
    Config,
    load_config,
    make_env,
    make_network,
    preset,
    save_config,
)
from fdqn.evaluate import evaluate
from fdqn.exploration import exponential_epsilon, linear_epsilon
from fdqn.learner import TrainState, create_train_state, make_optimizer, sync_target, update
from fdqn.replay import ReplayMemory
from fdqn.rollout import Rollout

EXIT_USAGE = 2
EXIT_NAN = 3
EXIT_INTERRUPTED = 130
MODEL_FILE = "model.keras"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


# -- building a run -------------------------------------------------------------


def epsilon_schedule(config: Config):
    if config.epsilon_schedule == "linear":
        duration = max(1, int(config.exploration_fraction * config.total_steps))
        return linear_epsilon(config.epsilon_start, config.epsilon_end, duration)
    return exponential_epsilon(config.epsilon_start, config.epsilon_end, config.epsilon_decay)


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

    ``cpu_layers`` computes the network through :func:`fdqn.cpu.space_to_depth_model`
    (same parameters; model files are still written from the stock network).
    """
    env = make_env(config)
    model = make_network(config, env, seed=config.seed)
    optimizer = make_optimizer(
        config.optimizer, config.lr, clip=config.clip, max_grad_norm=config.max_grad_norm
    )
    computed = cpu.space_to_depth_model(model) if cpu_layers else model
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
    """Loads a checkpoint into a freshly built run; returns notes on what could not be."""
    arrays, meta = checkpoint.load(path)
    notes = []
    state = run.state
    run.state = state.replace(
        params=checkpoint.arrays_to_tree("params", arrays, state.params),
        target_params=checkpoint.arrays_to_tree("target_params", arrays, state.target_params),
        opt_state=checkpoint.arrays_to_tree("opt_state", arrays, state.opt_state),
        key=checkpoint.arrays_to_tree("key", arrays, state.key),
        step=checkpoint.arrays_to_tree("step", arrays, state.step),
    )
    try:
        run.counters = Counters(**meta["counters"])
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"{path}: bad counters in meta.json ({e})") from None
    replay_path = os.path.join(path, "replay.npz")
    if meta.get("has_replay") and os.path.exists(replay_path):
        memory = ReplayMemory.load(replay_path)
        if (memory.capacity, memory.num_envs, memory.obs_shape) != (
            run.memory.capacity,
            run.memory.num_envs,
            run.memory.obs_shape,
        ):
            raise checkpoint.CheckpointError(f"{replay_path} does not fit this run's replay memory")
        run.memory = memory
        run.rollout.memory = memory
        replay_restored = True
    else:
        replay_restored = False
    try:
        run.rollout.load_state_dict(arrays, meta["rollout"])
    except (KeyError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{path}: rollout state does not fit ({e})") from None
    if not replay_restored:
        run.refill_until = run.rollout.agent_steps + run.config.learning_starts
        notes.append(
            f"replay memory not saved: it refills until agent step {run.refill_until:,} "
            f"before updates resume"
        )
    if meta.get("env_state") is not None and replay_restored:
        envs.set_state(run.rollout.env, meta["env_state"])
    else:
        # Without the replay memory or the emulator's state the old episodes
        # cannot go on: start new games at this point.
        run.rollout.restart(seed=run.config.seed + run.rollout.agent_steps)
        notes.append("environments restarted with new games")
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
) -> dict[str, Any]:
    """Runs (or resumes) training; returns a summary.

    Checkpoints hold the online and target parameters, optimizer state, PRNG
    keys, step and episode counters (and so the epsilon position), the
    rollout's state, the environments' state where they expose it (classic
    control), and, with ``save_replay``, the replay memory. Resuming with all
    of these gives the same parameters as training straight through.

    Args:
      config: a validated config.
      run_dir: the run directory (created by the caller).
      resume: continue from the newest checkpoint in ``run_dir``.
      stream: where progress goes (stderr by default).
      stop_at: stop (with a checkpoint) at this agent step, short of
        ``total_steps``; for tests of resumption.
      run: what ``build(config)`` returned, if the caller built it already.
    """
    run = run if run is not None else build(config)
    out = stream or sys.stderr
    if resume:
        path = checkpoint.latest_checkpoint(run_dir)
        if path is None:
            raise checkpoint.CheckpointError(f"{run_dir} has no checkpoint to resume from")
        notes = restore_checkpoint(run, path)
        for name in ("metrics.csv", "eval.csv"):
            reporting.truncate_csv(os.path.join(run_dir, name), run.rollout.agent_steps)
        out.write(f"resumed from {path}" + "".join(f"; {n}" for n in notes) + "\n")
    reporter = reporting.Reporter(
        run_dir,
        config.total_steps,
        config.log_every,
        out,
        start_step=run.rollout.agent_steps,
        learning_starts=max(config.learning_starts, run.refill_until),
    )
    schedule = epsilon_schedule(config)
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    limit = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    status = "finished"
    try:
        status = run_until(run, run_dir, reporter, schedule, limit, interrupted)
        if status == "finished":
            _checkpoint_if_finite(run, run_dir, run.metrics)
        if checkpoint.latest_checkpoint(run_dir) is not None:  # the run's network as it stands
            networks.save_model(run.model, run.state.params, os.path.join(run_dir, MODEL_FILE))
    finally:
        signal.signal(signal.SIGINT, previous_handler)
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
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "state"}, f, indent=2)
    return summary


def run_until(
    run: Run, run_dir: str, reporter, schedule, limit: int, interrupted: list = ()
) -> str:
    """Plays and learns until agent step ``limit`` (or the config's episode limit).

    Acts, stores, updates, syncs the target, reports, evaluates and writes
    the periodic checkpoints the config asks for; the final checkpoint is the
    caller's. Returns ``"finished"``, or ``"interrupted"`` (after writing a
    checkpoint) once ``interrupted`` is non-empty. Calling it again with a
    larger ``limit`` continues the same run.
    """
    config, counters, rollout, memory = run.config, run.counters, run.rollout, run.memory
    loss_kwargs = dict(
        gamma=config.gamma,
        double_q=config.double_q,
        huber_delta=config.huber_delta or None,
        reduction=config.loss_reduction,
        mask_terminal=config.mask_terminal,
    )
    metrics = run.metrics
    while rollout.agent_steps < limit and not (
        config.total_episodes and counters.episodes >= config.total_episodes
    ):
        if interrupted:
            path = _checkpoint_if_finite(run, run_dir, metrics)
            reporter.message(
                f"interrupted at agent step {rollout.agent_steps:,}; checkpoint {path}; "
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
    parser.add_argument("--preset", default="atari", choices=list(PRESETS), help="preset")
    parser.add_argument("--run-dir", default=None, help="run directory (default: under runs/)")
    parser.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue a run from its checkpoint"
    )
    parser.add_argument(
        "--cpu-tuning",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply fdqn.cpu's XLA flag, malloc options and space-to-depth convolutions "
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


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = vars(parser.parse_args(argv))
    preset_name = args.pop("preset")
    run_dir = args.pop("run_dir")
    resume_dir = args.pop("resume")
    cpu_tuning = args.pop("cpu_tuning")
    if cpu_tuning is None:
        cpu_tuning = not cpu.accelerator_installed()
    # before JAX computes anything (XLA reads its flags once); said once the flags are valid
    tuning = cpu.tune() if cpu_tuning else None

    def fail(message: str) -> int:
        print(f"fdqn.train: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        if resume_dir is not None:
            unexpected = sorted(set(args) - {"total_steps", "log_every"})
            if unexpected or run_dir is not None:
                names = ", ".join("--" + n.replace("_", "-") for n in unexpected or ["run_dir"])
                return fail(f"--resume continues a run with its own config; drop {names}")
            config = load_config(resume_dir).replace(**args).validate()
            if checkpoint.latest_checkpoint(resume_dir) is None:
                return fail(f"{resume_dir} has no checkpoint to resume from")
            run_dir = resume_dir
        else:
            config = preset(preset_name).replace(**args).validate()
            run_dir = run_dir or _default_run_dir(preset_name, config)
            if os.path.exists(run_dir) and os.listdir(run_dir):
                return fail(
                    f"run directory {run_dir} is not empty: continue it with --resume {run_dir} "
                    f"or choose another --run-dir"
                )
        if tuning is not None:
            print(
                f"fdqn.train: CPU tuning on ({tuning.describe()}; space-to-depth convolutions); "
                f"--no-cpu-tuning turns it off",
                file=sys.stderr,
            )
        print(f"fdqn.train: {config.env}, run directory {run_dir}", file=sys.stderr)
        # built before anything is written, so that a replay memory larger than the RAM
        # fails here; mapping the memory takes seconds per GiB on some machines
        run = build(config, cpu_layers=cpu_tuning)
    except ValueError as e:  # ConfigError included
        return fail(str(e))

    os.makedirs(run_dir, exist_ok=True)
    if resume_dir is None:
        save_config(config, run_dir)
    try:
        summary = train(config, run_dir, resume=resume_dir is not None, run=run)
    except NonFiniteLoss as e:
        last = checkpoint.latest_checkpoint(run_dir)
        print(
            f"fdqn.train: error: {e}; stopped, last good checkpoint: {last or 'none'}",
            file=sys.stderr,
        )
        return EXIT_NAN
    except checkpoint.CheckpointError as e:
        return fail(str(e))
    if summary["status"] == "interrupted":
        return EXIT_INTERRUPTED
    summary.pop("state")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
