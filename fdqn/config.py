"""The configuration of a training run: one frozen, documented dataclass.

Defaults are the Nature DQN recipe as current JAX practice runs it (CleanRL's
``dqn_atari_jax.py``) on Breakout, with the Nature CNN, Huber loss and
gradient clipping. Presets change a few fields at once:

- ``notebook``: the TF notebook fdqn started from, as written (its network,
  batch 64, RMSProp 1e-3, a 100,000-transition buffer, an update every agent
  step from the first full batch, a target copy every 10 episodes, its
  exponential epsilon decay, per-tensor clipping at 1.0, 20 episodes), but
  with terminal states masked in the target and the loss averaged, which
  the notebook got wrong.
- ``cartpole``: CartPole-v1 with an MLP, tuned to solve it in well under
  50,000 agent steps.
- ``minatar``: MinAtar Breakout (gymnax, compiled runs) with the MinAtar
  network, after the DQN settings of Young and Tian (2019) with 8
  environments and one update per 4 agent steps.

Every field is a command-line flag (``--total-steps``, ``--lr``, ...).
"""

import dataclasses
import json
import math
import os
from typing import Any

from fdqn import envs, jax_envs, networks, rundir
from fdqn.exploration import exponential_epsilon, linear_epsilon
from fdqn.networks import DTYPE_POLICIES

NETWORKS = ("nature", "notebook", "mlp", "minatar")
SCHEDULES = ("linear", "exponential")
TARGET_UNITS = ("steps", "episodes")
LOOPS = ("host", "compiled")


class ConfigError(ValueError):
    """A configuration value is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"--{field.replace('_', '-')}: {message}")
        self.field = field


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on. Steps are agent steps (4 frames on Atari)."""

    env: str = _field("BreakoutNoFrameskip-v4", "environment id (Atari game or gymnasium id)")
    network: str = _field("nature", f"Q-network: one of {', '.join(NETWORKS)}")
    hidden: tuple[int, ...] = _field((64, 64), "hidden widths of the mlp network, e.g. 128,128")
    dtype_policy: str = _field(
        "float32",
        "network compute dtype: float32, or mixed_bfloat16 (float32 weights, bfloat16 layers, "
        "float32 Q-values; for accelerators with bfloat16 matrix units)",
    )
    total_steps: int = _field(10_000_000, "agent steps to train for, over all environments")
    total_episodes: int = _field(0, "stop after this many finished games as well (0: no limit)")
    num_envs: int = _field(8, "environments stepped together as one batch (of each seed)")
    seed: int = _field(1, "seed of environments, initial weights, exploration and replay")
    num_seeds: int = _field(
        1,
        "agents trained at once, seeds --seed, --seed+1, ..., in one compiled program "
        "(gymnax envs map over the seeds; Atari and gymnasium envs are one vector env of "
        "num_seeds x num_envs, a block per seed)",
    )
    devices: int = _field(
        1,
        "JAX devices of each process the compiled run spreads over (gymnax envs): several "
        "seeds are split over them, one seed's envs and batches are (fdqn.parallel)",
    )
    loop: str = _field(
        "host",
        "training loop: host (a Python loop over jitted updates, envs stepped beside them) or "
        "compiled (the whole run in lax.scan chunks, fdqn.compiled); MinAtar and --num-seeds "
        "above 1 always run compiled",
    )
    optimizer: str = _field("adam", "optimizer: adam or rmsprop")
    lr: float = _field(1e-4, "learning rate, in (0, 1]")
    batch_size: int = _field(32, "transitions per gradient update")
    buffer_size: int = _field(1_000_000, "replay memory capacity, in transitions")
    learning_starts: int = _field(80_000, "agent steps of experience before the first update")
    train_every: int = _field(4, "agent steps per gradient update")
    target_update: int = _field(1_000, "copy the online network to the target every this many")
    target_update_unit: str = _field("steps", "unit of --target-update: steps or episodes")
    tau: float = _field(1.0, "target update rate: 1 copies, less is Polyak averaging")
    gamma: float = _field(0.99, "discount factor, in [0, 1]")
    double_q: bool = _field(False, "use double Q-learning targets")
    huber_delta: float = _field(1.0, "Huber loss threshold; 0 for the squared loss")
    loss_reduction: str = _field("mean", "reduce per-transition losses by mean or sum")
    mask_terminal: bool = _field(
        True, "no bootstrap after a terminal step (false: the notebook's bug, for benchmarks)"
    )
    clip: str = _field("global", "gradient clipping: global, per_tensor or none")
    max_grad_norm: float = _field(10.0, "gradient norm bound of --clip")
    epsilon_schedule: str = _field("linear", "exploration schedule: linear or exponential")
    epsilon_start: float = _field(1.0, "initial exploration rate")
    epsilon_end: float = _field(0.01, "final exploration rate")
    exploration_fraction: float = _field(0.10, "linear: fraction of total steps to decay over")
    epsilon_decay: int = _field(100_000, "exponential: time constant of the decay, in steps")
    terminal_on_life_loss: bool = _field(True, "Atari: a lost life is terminal for learning")
    sticky_actions: float = _field(-1.0, "Atari sticky-action probability; -1 takes it from the id")
    eval_every: int = _field(250_000, "agent steps between evaluations (0: none)")
    eval_episodes: int = _field(10, "games per evaluation")
    eval_epsilon: float = _field(0.05, "exploration rate while evaluating")
    checkpoint_every: int = _field(250_000, "agent steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _field(3, "checkpoints kept in the run directory")
    save_replay: bool = _field(
        False, "include the replay memory in checkpoints (large; compiled gymnax runs always do)"
    )
    prefault_replay: bool = _field(
        True,
        "map the replay memory's pages when it is built (Linux): no page faults while "
        "training and an error up front if it does not fit in RAM, at 1-4 s per GiB",
    )
    log_every: int = _field(10_000, "agent steps between log lines when not on a terminal")
    print_episodes: bool = _field(False, "print a line per finished game")

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "Config":
        """Checks every field; raises :class:`ConfigError` naming the first bad one."""
        positive = (
            "total_steps", "num_envs", "batch_size", "buffer_size", "train_every",
            "target_update", "eval_episodes", "keep_checkpoints", "log_every", "epsilon_decay",
            "num_seeds", "devices",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        for name in ("total_episodes", "learning_starts", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {value!r}")
        if not (0.0 < self.lr <= 1.0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"must be in (0, 1], got {self.lr}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError("gamma", f"must be in [0, 1], got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError("tau", f"must be in (0, 1], got {self.tau}")
        for name in ("epsilon_start", "epsilon_end", "eval_epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.exploration_fraction <= 1.0:
            raise ConfigError(
                "exploration_fraction", f"must be in (0, 1], got {self.exploration_fraction}"
            )
        if not (self.huber_delta >= 0 and math.isfinite(self.huber_delta)):
            raise ConfigError(
                "huber_delta",
                f"must be a finite number >= 0 (0: squared loss), got {self.huber_delta}",
            )
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(
                "max_grad_norm", f"must be a positive finite number, got {self.max_grad_norm}"
            )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ConfigError("seed", f"must be an integer in [0, 2**31), got {self.seed!r}")
        if not (self.sticky_actions == -1.0 or 0.0 <= self.sticky_actions <= 1.0):
            raise ConfigError(
                "sticky_actions", f"must be -1 or in [0, 1], got {self.sticky_actions}"
            )
        choices = {
            "network": NETWORKS,
            "dtype_policy": DTYPE_POLICIES,
            "optimizer": ("adam", "rmsprop"),
            "loop": LOOPS,
            "clip": ("global", "per_tensor", "none"),
            "loss_reduction": ("mean", "sum"),
            "epsilon_schedule": SCHEDULES,
            "target_update_unit": TARGET_UNITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"must be positive widths, got {self.hidden}")
        if self.total_steps < self.num_envs:
            raise ConfigError(
                "total_steps",
                f"must be at least --num-envs ({self.num_envs}): each step of the "
                f"environments is {self.num_envs} agent steps, got {self.total_steps}",
            )
        if self.buffer_size < self.num_envs:
            raise ConfigError(
                "buffer_size",
                f"must be at least --num-envs ({self.num_envs}), got {self.buffer_size}",
            )
        if self.batch_size > self.buffer_size:
            raise ConfigError(
                "batch_size",
                f"must not exceed --buffer-size ({self.buffer_size}), got {self.batch_size}",
            )
        if self.devices > 1:
            from fdqn import parallel

            if not jax_envs.is_jax_env(self.env):
                raise ConfigError(
                    "devices", f"several devices run gymnax envs; {self.env} is not one"
                )
            try:
                parallel.choose_layout(self.devices, self.num_seeds, self.num_envs, self.batch_size)
            except parallel.LayoutError as e:
                raise ConfigError("devices", str(e)) from None
        if jax_envs.is_minatar(self.env):
            if self.network != "minatar":
                raise ConfigError("network", f"{self.env} is a MinAtar game: use minatar")
            return self
        try:
            atari = envs.check_env_id(self.env)
        except ValueError as e:
            raise ConfigError("env", str(e)) from None
        if atari and self.network in ("mlp", "minatar"):
            raise ConfigError("network", f"{self.env} gives images: use nature or notebook")
        if not atari and self.network != "mlp":
            raise ConfigError("network", f"{self.env} gives vectors: use mlp")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "atari": {},
    "notebook": dict(
        env="BreakoutNoFrameskip-v4",
        network="notebook",
        num_envs=1,
        total_steps=10_000_000,
        total_episodes=20,
        optimizer="rmsprop",
        lr=1e-3,
        batch_size=64,
        buffer_size=100_000,
        learning_starts=64,
        train_every=1,
        target_update=10,
        target_update_unit="episodes",
        clip="per_tensor",
        max_grad_norm=1.0,
        epsilon_schedule="exponential",
        epsilon_start=1.0,
        epsilon_end=0.1,
        epsilon_decay=100_000,
        eval_every=0,
        checkpoint_every=0,
        print_episodes=True,
    ),
    "cartpole": dict(
        # Close to the rl-baselines3-zoo DQN recipe for CartPole: half an update per
        # agent step and a target copy every 128 updates.
        env="CartPole-v1",
        network="mlp",
        hidden=(256, 256),
        num_envs=1,
        total_steps=50_000,
        lr=2.3e-3,
        batch_size=64,
        buffer_size=50_000,
        learning_starts=1_000,
        train_every=2,
        target_update=256,
        clip="global",
        max_grad_norm=10.0,
        epsilon_end=0.04,
        exploration_fraction=0.16,
        terminal_on_life_loss=False,
        eval_every=2_500,
        eval_episodes=10,
        eval_epsilon=0.0,
        checkpoint_every=10_000,
        log_every=2_000,
    ),
    "minatar": dict(
        env="Breakout-MinAtar",
        network="minatar",
        num_envs=8,
        total_steps=1_000_000,
        optimizer="adam",
        lr=2.5e-4,
        batch_size=32,
        buffer_size=100_000,
        learning_starts=5_000,
        train_every=4,
        target_update=1_000,
        clip="global",
        max_grad_norm=10.0,
        epsilon_end=0.1,
        exploration_fraction=0.1,
        eval_every=50_000,
        eval_episodes=20,
        eval_epsilon=0.0,
        checkpoint_every=100_000,
        log_every=10_000,
    ),
}


def preset(name: str) -> Config:
    """The configuration of a named preset (``atari`` is the default recipe)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"must be one of {', '.join(PRESETS)}, got {name!r}")
    return Config(**PRESETS[name])


def epsilon_schedule(config: Config):
    """The exploration schedule a config describes, a function of the agent step."""
    if config.epsilon_schedule == "linear":
        duration = max(1, int(config.exploration_fraction * config.total_steps))
        return linear_epsilon(config.epsilon_start, config.epsilon_end, duration)
    return exponential_epsilon(config.epsilon_start, config.epsilon_end, config.epsilon_decay)


def loss_options(config: Config) -> dict[str, Any]:
    """The keyword arguments of :func:`fdqn.update` a config describes."""
    return dict(
        gamma=config.gamma,
        double_q=config.double_q,
        huber_delta=config.huber_delta or None,
        reduction=config.loss_reduction,
        mask_terminal=config.mask_terminal,
    )


def make_env(config: Config, num_envs: int | None = None, clip_rewards: bool = True):
    """The vector env a config describes (``num_envs`` overrides the config's)."""
    kwargs = {}
    if envs.is_atari(config.env):
        kwargs = dict(
            clip_rewards=clip_rewards,
            repeat_action_probability=None if config.sticky_actions < 0 else config.sticky_actions,
        )
    return envs.make(config.env, num_envs or config.num_envs, **kwargs)


def make_network(config: Config, env: Any, seed: int | None = None) -> Any:
    """The Keras Q-network (a ``keras.Model``) for ``env``'s observations and actions.

    ``seed`` fixes its initial weights (``None``: Keras' global seed).
    """
    num_actions = int(env.single_action_space.n)
    shape = env.single_observation_space.shape
    kwargs = dict(dtype_policy=config.dtype_policy, seed=seed)
    if config.network == "nature":
        return networks.nature_cnn(num_actions, shape, **kwargs)
    if config.network == "notebook":
        return networks.notebook_cnn(num_actions, shape, **kwargs)
    return networks.mlp(num_actions, int(shape[0]), config.hidden, **kwargs)


CONFIG_FILE = "config.json"
# Config fields added after runs were written with fdqn, and the value each such
# run had in effect: a config.json without them loads with these values.
FIELDS_ADDED_LATER: dict[str, Any] = {
    "dtype_policy": "float32", "num_seeds": 1, "loop": "host", "devices": 1,
}  # fmt: skip


def save_config(config: Config, run_dir: str) -> None:
    """Writes ``config`` atomically to ``RUN_DIR/config.json``, which :func:`load_config` reads."""
    rundir.atomic_write(
        os.path.join(run_dir, CONFIG_FILE),
        lambda f: json.dump(dataclasses.asdict(config), f, indent=2),
    )


def load_config(run_dir: str) -> Config:
    """The validated config saved in a run directory's ``config.json``.

    Raises:
      ValueError: one line naming the problem: no such run directory or file,
        a file that cannot be read or is not JSON, fields missing or unknown,
        or a value :meth:`Config.validate` rejects.
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        what = "is not a directory" if os.path.exists(run_dir) else "does not exist"
        raise ValueError(f"{run_dir} {what}: give the run directory fdqn.train wrote")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{run_dir} has no config.json: is it an fdqn run directory?") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a valid fdqn config: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a valid fdqn config: expected a JSON object")
    names = {field.name for field in dataclasses.fields(Config)}
    # fields newer than the run: the value that gives the behaviour the run had
    data = {**{k: v for k, v in FIELDS_ADDED_LATER.items() if k not in data}, **data}
    missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
    if missing or unknown:
        parts = [f"missing fields {', '.join(missing)}"] if missing else []
        parts += [f"unknown fields {', '.join(unknown)}"] if unknown else []
        raise ValueError(f"{path} is not a valid fdqn config: {'; '.join(parts)}")
    for field in dataclasses.fields(Config):
        if not _json_value_fits(data[field.name], field.default):
            kind = _JSON_KINDS.get(type(field.default), type(field.default).__name__)
            raise ValueError(
                f"{path} is not a valid fdqn config: {field.name} must be {kind}, "
                f"got {data[field.name]!r}"
            )
    data["hidden"] = tuple(data["hidden"])
    return Config(**data).validate()


_JSON_KINDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "a list of integers",
}


def _json_value_fits(value: Any, default: Any) -> bool:
    """Whether a value read from JSON has the type of the config field defaulting to ``default``."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
