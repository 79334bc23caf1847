"""The whole training run as one compiled program: acting, env steps, replay, updates, target sync.

:func:`make_run` turns a :class:`fdqn.config.Config` and a JAX-native
environment (:mod:`fdqn.jax_envs`) into a :class:`CompiledRun`. One agent
step of all environments is the pure function :meth:`CompiledRun.step`; a
stretch of them is ``jax.lax.scan`` of it under one ``jax.jit``
(:meth:`CompiledRun.run`), with the run's whole state in one immutable
carry (:class:`RunState`): learner state, replay contents, environment
state, counters and PRNG keys. Nothing leaves the device inside the scan.

Many seeds train in one program: :meth:`CompiledRun.init` with a list of
seeds stacks their states along a leading axis and :meth:`CompiledRun.run`
maps the step over it with ``jax.vmap``. gymnax environments are mapped
with the rest. Environments on the host (Atari, gymnasium callbacks) cannot
be: there one vector env of ``num_seeds x num_envs`` games is stepped once
per step, its batch split into one block of ``num_envs`` per seed, while
acting and learning are mapped over the seeds; its state, shared by all
seeds, stays outside the seed axis. Each seed has its own initial weights,
environments and exploration keys; the result of a seed does not depend on
which others run beside it.

On several devices (``make_run(config, mesh=...)``, :mod:`fdqn.parallel`) the
same steps run under ``jax.shard_map``: the seeds split over the mesh's
``seeds`` devices, each seed's envs, replay and batches over its ``data``
devices, with the gradients averaged across them.

Within a step the order is: epsilon from the agent step count, epsilon-
greedy actions of the online network, the environment step, the replay
write, the updates due (one every ``train_every`` agent steps from
``learning_starts`` on, each on a batch sampled uniformly from the replay,
which already holds this step's transitions), then the target sync.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fdqn import device_replay as dr
from fdqn import jax_envs, networks, parallel
from fdqn.config import Config, epsilon_schedule, loss_options
from fdqn.exploration import epsilon_greedy
from fdqn.learner import Batch, TrainState, make_optimizer, sync_target, update
from fdqn.networks import pure_q_fn

_LEARNER_METRICS = ("loss", "q_taken", "td_abs", "grad_norm")


class Counters(NamedTuple):
    """Progress of a run, int32 scalars."""

    agent_steps: jax.Array
    updates: jax.Array
    target_syncs: jax.Array
    episodes: jax.Array


class RunState(NamedTuple):
    """Everything a compiled run carries from one step to the next (a pytree)."""

    learner: TrainState
    replay: dr.TransitionRing | dr.FrameRing
    env_state: Any
    obs: jax.Array  # (num_envs, *obs_shape): what the agent acts on next
    episode_return: jax.Array  # (num_envs,) of the episodes under way
    episode_length: jax.Array  # (num_envs,) int32
    counters: Counters
    key: jax.Array  # exploration, environment and sampling randomness
    learner_metrics: dict[str, jax.Array]  # of the latest update (NaN before the first)


# the parts of a run's state that are a device's own when one agent's envs are split
# over devices (data shards): its envs, what it acts on next, its replay
_DEVICE_FIELDS = ("replay", "env_state", "obs", "episode_return", "episode_length")


def _per_device(state: "RunState") -> dict[str, Any]:
    return {f: getattr(state, f) for f in _DEVICE_FIELDS}


class StepMetrics(NamedTuple):
    """What one step reports (stacked along a time axis by :meth:`CompiledRun.run`).

    ``episode_return`` and ``episode_length`` are the finished episodes' (true
    scores and lengths) where ``done`` is set, and 0 elsewhere.
    """

    agent_steps: jax.Array
    epsilon: jax.Array
    done: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array
    updates: jax.Array
    learner: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledRun:
    """A configured run whose steps are pure functions of a :class:`RunState`.

    Made by :func:`make_run`; hashed by identity (a static argument of ``jit``).
    """

    config: Config
    env: jax_envs.JaxVecEnv | jax_envs.AtariXlaEnv | jax_envs.CallbackVecEnv
    model: Any  # the Keras network whose weights the seeds start from
    q_fn: Any
    optimizer: Any
    blocks: int = 1  # host envs: the seeds whose games env.num_envs holds, num_envs each
    mesh: Any = None  # a fdqn.parallel mesh: the run is shard_map-ped over its devices
    data_shards: int = 1  # devices one agent's envs and batches are split over
    learning_from: int = 0  # a resume without the replay: no updates before this step ...
    updates_skipped: int = 0  # ... and the updates owed meanwhile, skipped (refilling)

    @property
    def local_envs(self) -> int:
        """Environments per seed on one device."""
        return self.env.num_envs // self.blocks

    @property
    def num_envs(self) -> int:
        """Environments per seed."""
        return self.local_envs * self.data_shards

    @property
    def batch_share(self) -> int:
        """Transitions of each batch one device samples from its replay."""
        return self.config.batch_size // self.data_shards

    @property
    def _data_axis(self) -> str | None:
        return parallel.DATA if self.data_shards > 1 else None

    # -- the initial state --------------------------------------------------------

    def init(self, seeds: int | Sequence[int]) -> RunState:
        """The state at agent step 0 for one seed, or for several stacked on a leading axis.

        Initial weights are the Keras network's, drawn with the seed (as
        :func:`fdqn.config.make_network` does); environment, exploration and
        replay sampling keys come from ``jax.random.key(seed)``. On host
        environments the seeds are the run's ``blocks``: as many as its
        vector env was made for (``num_seeds`` of the config).
        """
        many = isinstance(seeds, (list, tuple))
        for seed in seeds if many else [seeds]:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
                raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
        if many and not seeds:
            raise ValueError("seeds must not be empty")
        if self.mesh is not None:
            return self._init_on_mesh(list(seeds) if many else [seeds])
        if not _vmappable(self.env) and (len(seeds) if many else 1) != self.blocks:
            raise ValueError(
                f"this run steps {self.blocks} seed(s) of {self.env.env_id} as one vector env "
                f"of {self.env.num_envs}: init it with {self.blocks} seed(s), got {seeds!r}"
            )
        if not many:
            state, reset_key = self._init_agent(seeds)
            obs, env_state = self.env.reset(reset_key)
            return self._with_envs(state, obs, env_state)
        if _vmappable(self.env):
            return _stack([self.init(s) for s in seeds])
        agents, reset_keys = zip(*(self._init_agent(s) for s in seeds))
        obs, env_state = self.env.reset(jnp.stack(reset_keys))  # a block of games per seed
        state = jax.vmap(self._with_envs, in_axes=(0, 0, None))(
            _stack(agents), obs.reshape(len(seeds), self.local_envs, *obs.shape[1:]), None
        )
        return state._replace(env_state=env_state)

    def _init_agent(self, seed: int) -> tuple[RunState, jax.Array]:
        """A seed's state without its environments, and the key that resets them."""
        _, params = pure_q_fn(_network(self.config, self.env, seed))
        learner = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            target_params=jax.tree.map(jnp.copy, params),
            opt_state=self.optimizer.init(params),
            key=jax.random.key(seed),
            q_fn=self.q_fn,
            optimizer=self.optimizer,
        )
        key, reset_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
        n = self.local_envs
        state = RunState(
            learner=learner,
            replay=None,
            env_state=None,
            obs=None,
            episode_return=jnp.zeros(n, jnp.float32),
            episode_length=jnp.zeros(n, jnp.int32),
            counters=Counters(*(jnp.zeros((), jnp.int32) for _ in Counters._fields)),
            key=key,
            learner_metrics={k: jnp.full((), jnp.nan, jnp.float32) for k in _LEARNER_METRICS},
        )
        return state, reset_key

    def _with_envs(self, state: RunState, obs: jax.Array, env_state: Any) -> RunState:
        return state._replace(replay=_start_replay(self, obs), env_state=env_state, obs=obs)

    def _init_on_mesh(self, seeds: list[int]) -> RunState:
        """Every seed's state, placed on the mesh; with data shards, a set of envs (and their
        replay) per device, each reset with its own key, on an axis after the seed axis."""
        seed_devices = self.mesh.shape[parallel.SEEDS]
        if len(seeds) % seed_devices:
            raise parallel.LayoutError(
                f"{len(seeds)} seeds do not split over the mesh's {seed_devices} seed devices"
            )
        states = []
        for seed in seeds:
            agent, reset_key = self._init_agent(seed)
            if self.data_shards == 1:
                states.append(self._with_envs(agent, *self.env.reset(reset_key)))
                continue
            shards = [
                self._with_envs(agent, *self.env.reset(jax.random.fold_in(reset_key, d)))
                for d in range(self.data_shards)
            ]
            states.append(shards[0]._replace(**_stack([_per_device(s) for s in shards])))
        return self.place(_stack(states))

    def state_specs(self) -> RunState:
        """How a state on the mesh is laid out: a ``PartitionSpec`` per field.

        The seed axis is split over the mesh's ``seeds`` devices; with data
        shards, the environments, observations and replay have a device axis
        after it, split over ``data``, while the learner, counters and keys are
        replicated there.
        """
        seeds = P(parallel.SEEDS)
        local = P(parallel.SEEDS, parallel.DATA) if self.data_shards > 1 else seeds
        return RunState(**{f: local if f in _DEVICE_FIELDS else seeds for f in RunState._fields})

    def place(self, state: RunState) -> RunState:
        """``state`` on the run's mesh (as it is without one), e.g. after a restore."""
        if self.mesh is None:
            return state
        specs = self.state_specs()
        return RunState(
            *(
                parallel.put(part, NamedSharding(self.mesh, spec))
                for part, spec in zip(state, specs)
            )
        )

    # -- one step -----------------------------------------------------------------

    def step(self, state: RunState) -> tuple[RunState, StepMetrics]:
        """One agent step of all environments, and the learning due after it (pure)."""
        action, epsilon, keys = self._act(state)
        out = self.env.step(keys[1], state.env_state, action)
        return self._after_env_step(state, action, epsilon, keys, out)

    def _learning_due(self, counters: Counters, replay) -> tuple[jax.Array, jax.Array]:
        """Whether learning has started after this step, and how many updates are due.

        ``counters`` and ``replay`` as they are before the step: the size that
        counts is the replay's once the step's transition is written.
        """
        config = self.config
        step = counters.agent_steps + self.num_envs
        written = replay._replace(writes=replay.writes + 1)  # only its size is read
        learning = (step >= max(config.learning_starts, self.learning_from)) & (
            self._replay_size(written) >= self.batch_share
        )
        planned = (step - config.learning_starts) // config.train_every + 1  # updates by now
        owed = planned - counters.updates - self.updates_skipped
        return learning, jnp.where(learning, jnp.maximum(0, owed), 0)

    def step_blocks(self, state: RunState) -> tuple[RunState, StepMetrics]:
        """:meth:`step` of every seed of a host environment, ``state`` on a seed axis.

        The seeds act at once (``vmap``), their actions form one batch of the
        vector env, and each seed's block of the result goes to its own
        learning. ``state.env_state``, the env's, has no seed axis.
        """
        agents = state._replace(env_state=None)
        action, epsilon, keys = jax.vmap(self._act)(agents)
        out = self.env.step(keys[1][0], state.env_state, action.reshape(-1))
        split = (self.blocks, self.local_envs)
        blocks = jax.tree.map(lambda x: x.reshape(*split, *x.shape[1:]), out._replace(state=None))
        # the seeds step in lockstep, so the learning due is every seed's: computed
        # once, outside the vmap, it leaves the updates' loop a plain loop (a
        # batched trip count would make it select every parameter after every update)
        first = jax.tree.map(lambda x: x[0], agents)
        due = self._learning_due(first.counters, first.replay)
        agents, metrics = jax.vmap(self._after_env_step, in_axes=(0, 0, 0, 0, 0, None))(
            agents, action, epsilon, keys, blocks, due
        )
        return agents._replace(env_state=out.state), metrics

    def _act(self, state: RunState):
        """Epsilon from the step count and the epsilon-greedy actions of the online network."""
        key, act_key, env_key, learn_key = jax.random.split(state.key, 4)
        if self._data_axis:  # every device its own actions, env steps and batches
            shard = jax.lax.axis_index(self._data_axis)
            act_key, env_key, learn_key = (
                jax.random.fold_in(k, shard) for k in (act_key, env_key, learn_key)
            )
        epsilon = epsilon_schedule(self.config)(state.counters.agent_steps)
        q = state.learner.q_fn(state.learner.params, state.obs)
        return epsilon_greedy(act_key, q, epsilon), epsilon, (key, env_key, learn_key)

    def _after_env_step(self, state, action, epsilon, keys, out, due=None):
        """The replay write, the updates due, the target sync and the counters.

        ``due``: :meth:`_learning_due` of ``state``, when the caller has it.
        """
        config, n = self.config, self.num_envs
        key, _, learn_key = keys
        counters, learner = state.counters, state.learner
        learning, due = self._learning_due(counters, state.replay) if due is None else due
        replay = self._replay_add(state.replay, state.obs, action, out)
        step = counters.agent_steps + n
        learner, learner_metrics = self._learn(
            learner, replay, learn_key, due, state.learner_metrics
        )

        done = out.done
        episode_return = state.episode_return + out.score
        episode_length = state.episode_length + out.valid.astype(jnp.int32)
        ended = jnp.sum(done, dtype=jnp.int32)
        if self._data_axis:
            ended = jax.lax.psum(ended, self._data_axis)
        episodes = counters.episodes + ended
        if config.target_update_unit == "steps":
            sync = learning & (step // config.target_update > counters.target_syncs)
            syncs = jnp.where(sync, step // config.target_update, counters.target_syncs)
        else:  # after episodes 0, T, 2T, ... (0-based), as the host loop
            t = config.target_update
            sync = (episodes + t - 1) // t > (counters.episodes + t - 1) // t
            syncs = counters.target_syncs + sync.astype(jnp.int32)
        learner = jax.lax.cond(sync, lambda s: sync_target(s, config.tau), lambda s: s, learner)

        metrics = StepMetrics(
            agent_steps=step,
            epsilon=jnp.asarray(epsilon, jnp.float32),
            done=done,
            episode_return=jnp.where(done, episode_return, 0.0),
            episode_length=jnp.where(done, episode_length, 0),
            updates=counters.updates + due,
            learner=learner_metrics,
        )
        state = RunState(
            learner=learner,
            replay=replay,
            env_state=out.state,
            obs=out.obs,
            episode_return=jnp.where(done, 0.0, episode_return),
            episode_length=jnp.where(done, 0, episode_length),
            counters=Counters(step, counters.updates + due, syncs, episodes),
            key=key,
            learner_metrics=learner_metrics,
        )
        return state, metrics

    def _learn(self, learner, replay, key, due, metrics):
        """``due`` updates, each on a fresh uniform batch (a loop of dynamic length)."""
        config = self.config
        loss_kwargs = loss_options(config)

        def one_update(i, carry):
            learner, metrics = carry
            batch = self._replay_sample(replay, jax.random.fold_in(key, i))
            learner, new = update(learner, batch, **loss_kwargs, axis_name=self._data_axis)
            return learner, {k: new[k].astype(jnp.float32) for k in _LEARNER_METRICS}

        return jax.lax.fori_loop(0, due, one_update, (learner, metrics))

    # -- the replay: whole transitions, or one frame per step for frame stacks ---

    def _replay_start(self, obs):
        # with data shards each device keeps its envs' share: the same length per env
        n, capacity = self.local_envs, self.config.buffer_size // self.data_shards
        if not self.env.frame_stack:
            dtype = getattr(self.env, "replay_dtype", jnp.float32)
            return dr.ring_init(capacity, n, self.env.obs_shape, dtype)
        ring = dr.frame_ring_init(capacity, n, self.env.obs_shape)
        zeros = jnp.zeros(n, jnp.int32)
        return dr.frame_ring_add(ring, obs, zeros, zeros, zeros.astype(bool), ~zeros.astype(bool))

    def _replay_add(self, replay, obs, action, out):
        if not self.env.frame_stack:
            return dr.ring_add(
                replay, Batch(obs, action, out.reward, out.final_obs, out.terminated)
            )
        return dr.frame_ring_add(replay, out.obs, action, out.reward, out.terminated, ~out.valid)

    def _replay_size(self, replay):
        if not self.env.frame_stack:
            return dr.ring_size(replay)
        return dr.frame_ring_size(replay, self.env.frame_stack)

    def _replay_sample(self, replay, key):
        size = self.batch_share
        if not self.env.frame_stack:
            batch = dr.ring_sample(replay, key, size)
            return batch._replace(
                obs=batch.obs.astype(jnp.float32), next_obs=batch.next_obs.astype(jnp.float32)
            )
        return dr.frame_ring_sample(replay, key, size, self.env.frame_stack)

    # -- many steps ---------------------------------------------------------------

    def run(self, state: RunState, num_steps: int) -> tuple[RunState, StepMetrics]:
        """``num_steps`` steps as one ``lax.scan`` under ``jax.jit``.

        ``state`` from ``init(seed)`` or ``init([seeds])`` (then every seed
        steps at once, ``vmap``-ped); its buffers are donated: use the state
        returned. Metrics come back stacked, ``(num_steps, ...)`` or
        ``(num_seeds, num_steps, ...)``.
        """
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        batched = state.counters.agent_steps.ndim == 1
        return _compiled(self, num_steps, batched)(state)

    def evaluate(self, params: Any, key: jax.Array, episodes: int, epsilon: float) -> jax.Array:
        """True returns of ``episodes`` whole games of the epsilon-greedy policy (pure).

        The games are played at once, one environment each, until every one
        has ended (at most the environment's time limit). ``params`` and
        ``key`` may carry a leading seed axis: then every seed plays its own.
        """
        if not isinstance(episodes, int) or episodes < 1:
            raise ValueError(f"episodes must be a positive integer, got {episodes!r}")
        batched = jax.tree.leaves(params)[0].ndim > len(self.model.weights[0].shape)
        return _evaluator(self, episodes, float(epsilon), batched)(params, key)

    def restart_envs(self, state: RunState) -> RunState:
        """``state`` with every environment on a new episode, for environments whose state
        lives on the host (Atari, gymnasium callbacks): a checkpoint cannot hold their
        emulators, so a resumed run starts new games. The frame ring marks the break (the
        new first frames), so no transition spans it; the replay, learner, counters and keys
        are kept. gymnax runs never need this: their env state is in the carry.
        ``state``'s buffers are donated (the replay is written in place): use the state
        returned."""
        batched = state.counters.agent_steps.ndim == 1
        agents = _seed_axis(state) if not batched else state._replace(env_state=None)
        keys = jax.vmap(jax.random.fold_in)(agents.key, agents.counters.agent_steps)
        obs, env_state = self.env.reset(keys)  # a block of new games per seed
        obs = obs.reshape(self.blocks, self.local_envs, *obs.shape[1:])

        agents = _restart(self, agents, obs)._replace(env_state=env_state)
        return agents if batched else _no_seed_axis(agents)

    def refilling(self, counters: Counters) -> "CompiledRun":
        """This run, continuing from ``counters`` with an empty replay: no updates for
        ``learning_starts`` agent steps while it refills, the updates owed meanwhile
        skipped, not made up (as the host loop does)."""
        step = int(np.max(counters.agent_steps))
        updates = int(np.max(counters.updates))
        # the first update from learning_from on is the (planned - 1)-th one had none been skipped
        planned = step // self.config.train_every + 1
        return dataclasses.replace(
            self,
            learning_from=step + self.config.learning_starts,
            updates_skipped=max(0, planned - 1 - updates),
        )

    @property
    def exact_resume(self) -> bool:
        """Whether a checkpointed state continues exactly (the env state is in the carry)."""
        return _vmappable(self.env)

    def steps_for(self, agent_steps: int) -> int:
        """Steps of all environments that reach ``agent_steps`` of a seed (rounded up)."""
        return -(-agent_steps // self.num_envs)


def _vmappable(env) -> bool:
    """Whether ``env``'s steps map over seeds: gymnax's do; host emulators and callbacks do not."""
    return isinstance(env, jax_envs.JaxVecEnv)


def _stack(states):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def _seed_axis(state: RunState) -> RunState:
    """A one-seed state of a host environment as a seed axis of one (the env's state as is)."""
    return jax.tree.map(lambda x: x[None], state._replace(env_state=None))._replace(
        env_state=state.env_state
    )


def _no_seed_axis(state: RunState) -> RunState:
    return jax.tree.map(lambda x: x[0], state._replace(env_state=None))._replace(
        env_state=state.env_state
    )


# The replay's first write, at the start and on a restart, runs in one program with
# the buffer it writes to: made op by op, each write would copy the whole buffer
# (gigabytes for Atari), which doubles the run's peak memory.


@functools.partial(jax.jit, static_argnums=0)
def _start_replay(run: CompiledRun, obs: jax.Array):
    """The run's empty replay with the first observations ``obs`` written."""
    return run._replay_start(obs)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _restart(run: CompiledRun, agents: RunState, obs: jax.Array) -> RunState:
    """Every seed's agent (a seed axis, no env state) on new games whose first stacks are
    ``obs``: marked in the frame ring, episode counts zeroed."""

    def one(agent, obs):
        replay = agent.replay
        if run.env.frame_stack:
            zeros = jnp.zeros(run.local_envs, jnp.int32)
            replay = dr.frame_ring_add(replay, obs, zeros, zeros, zeros > 0, zeros == 0)
        return agent._replace(
            replay=replay,
            obs=obs,
            episode_return=jnp.zeros_like(agent.episode_return),
            episode_length=jnp.zeros_like(agent.episode_length),
        )

    return jax.vmap(one)(agents, obs)


@functools.lru_cache(maxsize=32)
def _compiled(run: CompiledRun, num_steps: int, batched: bool):
    if run.mesh is not None:
        return _on_mesh(run, num_steps)
    if _vmappable(run.env):

        def scan(state):
            return jax.lax.scan(lambda s, _: run.step(s), state, length=num_steps)

        return jax.jit(jax.vmap(scan) if batched else scan, donate_argnums=0)

    def blocks(state):  # metrics (num_seeds, num_steps, ...) as vmap of a scan gives them
        state, metrics = jax.lax.scan(lambda s, _: run.step_blocks(s), state, length=num_steps)
        return state, jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), metrics)

    def one_seed(state):
        state, metrics = blocks(_seed_axis(state))
        return _no_seed_axis(state), jax.tree.map(lambda x: x[0], metrics)

    return jax.jit(blocks if batched else one_seed, donate_argnums=0)


def _on_mesh(run: CompiledRun, num_steps: int):
    """The scan of every seed under ``shard_map``: each device steps its block of the state.

    A device holds its seeds (all of their parts when the ``data`` axis has
    one device; else its own envs and replay, and a copy of the learner) and
    runs the steps of one device on them; only the gradient means and the
    episode counts cross devices.
    """
    sharded = run.data_shards > 1
    specs = run.state_specs()
    seeds = P(parallel.SEEDS)
    per_env = P(parallel.SEEDS, None, parallel.DATA) if sharded else seeds
    metric_specs = StepMetrics(
        agent_steps=seeds, epsilon=seeds, done=per_env, episode_return=per_env,
        episode_length=per_env, updates=seeds, learner=seeds,
    )  # fmt: skip

    def scan(state):
        return jax.lax.scan(lambda s, _: run.step(s), state, length=num_steps)

    def block(state):  # this device's seeds; with data shards, its one set of envs
        if sharded:
            state = state._replace(**jax.tree.map(lambda x: x[:, 0], _per_device(state)))
        state, metrics = jax.vmap(scan)(state)
        if sharded:
            state = state._replace(**jax.tree.map(lambda x: x[:, None], _per_device(state)))
        return state, metrics

    mapped = parallel.shard_map(block, run.mesh, in_specs=(specs,), out_specs=(specs, metric_specs))
    return jax.jit(mapped, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _evaluator(run: CompiledRun, episodes: int, epsilon: float, batched: bool):
    """Greedy-ish games: one seed's, or (``batched``) every seed's on its own games.

    gymnax games map over the seeds with the rest; host games of all seeds are
    one vector env of ``blocks x episodes``, a block per seed.
    """
    vmappable = _vmappable(run.env)
    seeds = 1 if vmappable or not batched else run.blocks
    env = run.env.resized(seeds * episodes)
    limit = env.max_episode_steps + 1  # + 1: a next-step autoreset takes a step more

    def act(params, key, obs):
        key, act_key, env_key = jax.random.split(key, 3)
        return key, env_key, epsilon_greedy(act_key, run.q_fn(params, obs), epsilon)

    def play(params, key):  # params and key with a seed axis of `seeds`
        key, reset_key = jax.vmap(jax.random.split, out_axes=1)(key)
        obs, env_state = env.reset(reset_key[0] if vmappable else reset_key)
        ended = jnp.zeros(seeds * episodes, bool)

        def unfinished(carry):
            t, *_, ended = carry
            return (t < limit) & ~jnp.all(ended)

        def step(carry):
            t, key, obs, env_state, returns, ended = carry
            blocks = obs.reshape(seeds, episodes, *obs.shape[1:])
            key, env_key, action = jax.vmap(act)(params, key, blocks)
            out = env.step(env_key[0], env_state, action.reshape(-1))
            returns = returns + jnp.where(ended, 0.0, out.score)
            ended = ended | out.done
            return t + 1, key, out.obs, out.state, returns, ended

        returns = jnp.zeros(seeds * episodes, jnp.float32)
        carry = (jnp.zeros((), jnp.int32), key, obs, env_state, returns, ended)
        return jax.lax.while_loop(unfinished, step, carry)[4].reshape(seeds, episodes)

    def one(params, key):
        return play(*jax.tree.map(lambda x: x[None], (params, key)))[0]

    if vmappable:
        return jax.jit(jax.vmap(one) if batched else one)
    return jax.jit(play if batched else one)


def _network(config: Config, env, seed: int | None):
    kwargs = dict(dtype_policy=config.dtype_policy, seed=seed)
    if config.network == "mlp":
        return networks.mlp(env.num_actions, int(env.obs_shape[0]), config.hidden, **kwargs)
    build = {
        "nature": networks.nature_cnn,
        "notebook": networks.notebook_cnn,
        "minatar": networks.minatar_cnn,
    }[config.network]
    return build(env.num_actions, env.obs_shape, **kwargs)


def make_env(config: Config):
    """The environment of a compiled run of ``config``.

    gymnax for its ids (``num_envs`` of them: seeds map over them), Atari
    through ale-py's XLA calls, any other gymnasium id through host callbacks
    (``num_seeds x num_envs`` in one vector env).

    Raises:
      ValueError: an id neither gymnax, Atari nor gymnasium knows.
      fdqn.jax_envs.GymnaxMissing: a gymnax id, and gymnax is not installed.
    """
    if jax_envs.is_jax_env(config.env):
        return jax_envs.make(config.env, config.num_envs)
    from fdqn import envs

    n = config.num_seeds * config.num_envs  # one vector env: a block of num_envs per seed
    if envs.is_atari(config.env):
        return jax_envs.make_atari(
            config.env,
            n,
            repeat_action_probability=None if config.sticky_actions < 0 else config.sticky_actions,
            terminal_on_life_loss=config.terminal_on_life_loss,
        )
    return jax_envs.make_callback(config.env, n)


def make_run(config: Config, env=None, cpu_layers: bool = False, mesh=None) -> CompiledRun:
    """The compiled run of a validated ``config`` on a JAX-native environment.

    ``env`` defaults to :func:`make_env` of the config; a host environment
    must hold ``num_seeds x num_envs`` games. ``cpu_layers``
    computes the network through :func:`fdqn.cpu.cpu_model` (the
    same parameters), as :func:`fdqn.train.build` does. ``mesh``
    (:func:`fdqn.parallel.make_mesh`) runs it over several devices: seeds
    split over its ``seeds`` axis, each agent's envs and batches over its
    ``data`` axis (gymnax environments only).

    Raises:
      ValueError: the config asks for something the compiled run does not do.
      fdqn.parallel.LayoutError: the mesh does not fit the config or the env.
      fdqn.jax_envs.GymnaxMissing: gymnax is not installed.
    """
    config = config.validate()
    shards = 1
    if mesh is not None:
        shards = int(mesh.shape[parallel.DATA])
        if not jax_envs.is_jax_env(config.env):
            raise parallel.LayoutError(
                f"several devices run JAX-native environments (gymnax); {config.env} steps "
                f"on the host: use one device"
            )
        for name, value in (("--num-envs", config.num_envs), ("--batch-size", config.batch_size)):
            if value % shards:
                raise parallel.LayoutError(
                    f"{name} {value} does not split over {shards} data devices"
                )
    if env is None:  # with data shards, each device's share of the envs
        env = make_env(config.replace(num_envs=config.num_envs // shards))
    blocks = 1
    if not _vmappable(env):
        blocks = config.num_seeds
        if env.num_envs != blocks * config.num_envs:
            raise ValueError(
                f"{env.env_id}: the env holds {env.num_envs} games; {blocks} seed(s) of "
                f"--num-envs {config.num_envs} need one of {blocks * config.num_envs}"
            )
    model = _network(config, env, seed=config.seed)
    if cpu_layers:
        from fdqn import cpu

        q_fn, _ = pure_q_fn(cpu.cpu_model(model))
    else:
        q_fn, _ = pure_q_fn(model)
    optimizer = make_optimizer(
        config.optimizer, config.lr, clip=config.clip, max_grad_norm=config.max_grad_norm
    )
    return CompiledRun(
        config=config, env=env, model=model, q_fn=q_fn, optimizer=optimizer, blocks=blocks,
        mesh=mesh, data_shards=shards,
    )  # fmt: skip
