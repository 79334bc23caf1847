"""Past one device: seeds sharded over a mesh, a data-parallel learner, many hosts.

fdqn scales with JAX's own machinery. A compiled run (:mod:`fdqn.compiled`)
on several devices runs under ``jax.shard_map`` over a two-axis
:class:`jax.sharding.Mesh`:

- ``seeds``: the seed axis of the run's state is split over the devices of
  this axis, each device training its own seeds, with no communication
  between them; a seed's result is the one it has on one device.
- ``data``: one agent's environments and each sampled batch are split over
  the devices of this axis. Each device steps ``num_envs / d`` environments,
  keeps their transitions in a replay of its own and samples ``batch_size /
  d`` of each batch from it (uniform over all transitions, drawn evenly from
  every device's share); the gradients are averaged across the axis
  (:func:`fdqn.learner.update`'s ``axis_name``), so the parameters and
  optimizer state, replicated, take the step of the whole batch everywhere.

:func:`choose_layout` picks the layout from the device count and the config:
the seeds go over the ``seeds`` axis as far as they divide evenly, each seed
over ``data`` for the rest.

Many hosts run the same program after :func:`initialize` (``jax.distributed``):
the mesh then spans every process's devices, each process steps the
environments of its own devices and holds their share of the replay.
"""

import dataclasses
import math
import os
import threading

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fdqn.learner import update

SEEDS, DATA = "seeds", "data"


class LayoutError(ValueError):
    """A device layout the run cannot take (one line, naming what would work)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a run's devices are arranged: ``seeds x data`` of them.

    Attributes:
      seeds: devices the seed axis is split over.
      data: devices each agent's environments and batches are split over.
    """

    seeds: int
    data: int

    @property
    def devices(self) -> int:
        return self.seeds * self.data

    def __str__(self) -> str:
        return f"{self.seeds} (seeds) x {self.data} (data)"


def choose_layout(
    num_devices: int, num_seeds: int, num_envs: int, batch_size: int, processes: int = 1
) -> Layout:
    """The layout of ``num_devices`` devices for a run of ``num_seeds`` agents.

    The seeds are split over as many devices as divide them evenly
    (``gcd(num_seeds, num_devices)``); each seed is data-parallel over the
    rest (``num_envs`` and ``batch_size`` multiples of their number). So 8
    seeds on 4 devices are 4 x 1, one seed 1 x 4, 2 seeds 2 x 2.

    Raises:
      LayoutError: no layout fits; the message names the numbers that do.
    """
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise LayoutError(f"--devices must be a positive integer, got {num_devices!r}")
    if num_devices % processes:
        raise LayoutError(f"{num_devices} devices do not split evenly over {processes} processes")
    seeds = math.gcd(num_seeds, num_devices)
    data = num_devices // seeds
    for name, value in (("--num-envs", num_envs), ("--batch-size", batch_size)):
        if value % data:
            raise LayoutError(
                f"{name} {value} does not split over {data} devices (--num-seeds {num_seeds} "
                f"on {num_devices} devices: each seed's envs and batches are split over {data}): "
                f"use a multiple of {data}, or a multiple of {num_devices} seeds"
            )
    return Layout(seeds=seeds, data=data)


def make_mesh(layout: Layout, devices=None) -> Mesh:
    """A ``(seeds, data)`` mesh of the first ``layout.devices`` of ``devices`` (default: all).

    Raises:
      LayoutError: fewer devices than the layout needs.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < layout.devices:
        raise LayoutError(
            f"the layout {layout} needs {layout.devices} devices; "
            f"{len(devices)} are visible ({devices[0].platform})"
        )
    grid = np.array(devices[: layout.devices], dtype=object).reshape(layout.seeds, layout.data)
    return Mesh(grid, (SEEDS, DATA))


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` of ``f`` without the replication check.

    fdqn's mapped functions return the learner, counters and keys replicated
    over ``data`` because every device applies the same gradient mean: equal
    by construction, which the check cannot see through the update loop.

    Raises:
      LayoutError: this JAX has no ``jax.shard_map`` (JAX 0.7 and later do).
    """
    if not hasattr(jax, "shard_map"):
        raise LayoutError(
            f"several devices need jax>=0.7 (jax.shard_map); this is {jax.__version__}"
        )
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def devices_per_process(count: int) -> list:
    """The first ``count`` devices of every process, process by process (for :func:`make_mesh`).

    Raises:
      LayoutError: a process has fewer devices.
    """
    by_process: dict[int, list] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    for index, devices in sorted(by_process.items()):
        if len(devices) < count:
            raise LayoutError(
                f"--devices {count}: process {index} has {len(devices)} "
                f"{devices[0].platform} device(s)"
            )
    return [d for _, devices in sorted(by_process.items()) for d in devices[:count]]


def put(tree, sharding):
    """``tree`` placed with ``sharding``, which may span the devices of many processes.

    Every process passes the same values: each keeps the shards of its own
    devices, cut from its host copy (PRNG keys as their key data).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def data_parallel_update(mesh: Mesh, **loss_options):
    """:func:`fdqn.learner.update` of one learner over the mesh's ``data`` devices.

    Returns a jitted ``(state, batch) -> (state, metrics)``: the state
    replicated, the batch's leading axis split over ``data`` (its size a
    multiple of the axis'), each device computing the gradient of its slice
    and all of them applying the mean, which is the gradient of the whole
    batch: the result is the one-device update's up to float rounding.
    ``loss_options`` are :func:`fdqn.learner.update`'s (``gamma``, ...).
    """

    def local(state, batch):
        return update(state, batch, axis_name=DATA, **loss_options)

    return jax.jit(shard_map(local, mesh, in_specs=(P(), P(DATA)), out_specs=(P(), P())))


# -- many hosts -------------------------------------------------------------------

# what a cluster's scheduler sets, read when a flag is not given: the coordinator,
# the process count and this process's index
CLUSTER_ENV = {
    "coordinator": ("FDQN_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("FDQN_NUM_PROCESSES", "JAX_NUM_PROCESSES", "SLURM_NTASKS", "WORLD_SIZE"),
    "process_id": ("FDQN_PROCESS_ID", "JAX_PROCESS_ID", "SLURM_PROCID", "RANK"),
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where this process stands among the processes of one run."""

    coordinator: str | None
    num_processes: int
    process_id: int

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1


def cluster_from(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ=os.environ,
) -> Cluster:
    """The run's processes from flags, else from the cluster's environment variables.

    Raises:
      LayoutError: an unreadable or inconsistent value.
    """

    def pick(name, value):
        if value is not None:
            return value
        for var in CLUSTER_ENV[name]:
            if environ.get(var, "") != "":
                return environ[var]
        return None

    coordinator = pick("coordinator", coordinator)
    values = {}
    for name, value in (("num_processes", num_processes), ("process_id", process_id)):
        value = pick(name, value)
        try:
            values[name] = None if value is None else int(value)
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise LayoutError(f"{flag}: not an integer: {value!r}") from None
    n, i = values["num_processes"], values["process_id"]
    if n is None or n == 1:
        if i not in (None, 0):
            raise LayoutError(f"--process-id {i} needs --num-processes above {i}")
        return Cluster(coordinator, 1, 0)
    if n < 1:
        raise LayoutError(f"--num-processes must be a positive integer, got {n}")
    if i is None or not 0 <= i < n:
        raise LayoutError(f"--process-id must be in [0, {n}) for {n} processes, got {i}")
    if not coordinator:
        raise LayoutError(
            f"{n} processes need --coordinator HOST:PORT (process 0's address), or "
            f"{CLUSTER_ENV['coordinator'][0]} set"
        )
    return Cluster(coordinator, n, i)


def initialize(cluster: Cluster, timeout_s: int = 60, on_timeout=None) -> None:
    """Joins the run's processes through ``jax.distributed`` (nothing for one process).

    JAX's runtime ends the process (an abort with a stack trace) when the
    others do not join in time. ``on_timeout(message)``, if given, is called
    instead, from a watchdog thread, once ``timeout_s`` have passed: the
    command line prints the message as its one-line error and exits.

    Raises:
      LayoutError: the runtime refused to start (e.g. a malformed address).
    """
    if not cluster.distributed:
        return
    message = (
        f"process {cluster.process_id} of {cluster.num_processes} could not join the run's "
        f"processes at {cluster.coordinator} within {timeout_s} s (is process 0 running, "
        f"and every process started with --num-processes {cluster.num_processes}?)"
    )
    watchdog = None
    if on_timeout is not None:
        watchdog = threading.Timer(timeout_s, on_timeout, args=(message,))
        watchdog.daemon = True
        watchdog.start()
        timeout_s += 60  # the runtime's own deadline after the watchdog's
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as e:  # the runtime's errors are of several kinds, each many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayoutError(f"{message}: {first}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
