"""Checkpoints: atomic, pickle-free, validated on load.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-NNNNNNNNNNNN`` holding
``arrays.npz`` (every array: parameters, optimizer state, PRNG keys, ...),
``meta.json`` (counters and other plain data) and optional extra files (the
replay memory, environment state). It is written under a temporary name and
renamed into place, so a crash never leaves a half-written checkpoint, and
only the newest ``keep`` are kept. Loading validates ``meta.json`` before
any of it is used, and :func:`restore_newest` falls back to the newest intact
checkpoint when a newer one is damaged.
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from fdqn.rundir import fsync_dir, fsync_tree

FORMAT = "fdqn.checkpoint/1"
_NAME = re.compile(r"step-(\d{12})")
_TMP = re.compile(r"\.tmp-step-(\d{12})-\d+(-old)?")
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the run loading it."""


def tree_to_arrays(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    """Flattens a pytree into ``{prefix/i: array}``; PRNG keys become their key data."""
    arrays = {}
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arrays[f"{prefix}/{i}"] = np.asarray(leaf)
    return arrays


def arrays_to_tree(prefix: str, arrays: dict[str, np.ndarray], template: Any) -> Any:
    """Rebuilds a pytree shaped like ``template`` from :func:`tree_to_arrays` output."""
    leaves, treedef = jax.tree.flatten(template)
    stored = sum(1 for k in arrays if k.startswith(prefix + "/"))
    if stored != len(leaves):
        raise CheckpointError(f"{prefix} has {stored} arrays, this run expects {len(leaves)}")
    restored = []
    for i, leaf in enumerate(leaves):
        value = arrays[f"{prefix}/{i}"]
        is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        want = jax.random.key_data(leaf) if is_key else leaf
        if value.shape != tuple(want.shape) or value.dtype != want.dtype:
            raise CheckpointError(
                f"{prefix}/{i} has shape {value.shape} {value.dtype}, this run expects "
                f"{tuple(want.shape)} {want.dtype} (was the checkpoint made with another config?)"
            )
        restored.append(jax.random.wrap_key_data(value) if is_key else jax.numpy.asarray(value))
    return jax.tree.unflatten(treedef, restored)


def list_checkpoints(run_dir: str) -> list[str]:
    """Published checkpoints of a run (intact or not), oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.fullmatch(n))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def step_of(path: str) -> int:
    """The agent step a checkpoint directory is named after."""
    return int(_NAME.fullmatch(os.path.basename(path)).group(1))


def path_of(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:012d}")


def recover(run_dir: str) -> list[str]:
    """Tidies what dead writers left in ``RUN_DIR/checkpoints``; returns what it did.

    Call it holding the run's lock (no other process is writing). A
    ``.tmp-*`` directory is a checkpoint that was never published: removed.
    A ``.tmp-...-old`` directory is a published checkpoint set aside while
    the same step was written again: put back if the new one never took its
    place, removed otherwise.
    """
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = []
    for name in sorted(os.listdir(root)):
        match = _TMP.fullmatch(name)
        if not match:
            continue
        path = os.path.join(root, name)
        final = os.path.join(root, f"step-{match.group(1)}")
        if match.group(2) and not os.path.exists(final):
            os.rename(path, final)
            done.append(f"restored {final} from {name}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed unfinished {path}")
    return done


def save(
    run_dir: str,
    step: int,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    extra_files: dict[str, Callable[[str], None]] | None = None,
    keep: int = 3,
) -> str:
    """Writes a checkpoint atomically and prunes old ones; returns its path.

    Everything is written into ``checkpoints/.tmp-step-N-PID``, flushed to the
    disk (files, then the directory), and published by one rename. A crash or
    a full disk before the rename leaves the published checkpoints as they
    were (the temporary directory is removed, or by :func:`recover` at the
    next start); old checkpoints are pruned only after the new one is in place.

    Args:
      run_dir: the run directory.
      step: the agent step count, which names the checkpoint.
      arrays: named arrays (see :func:`tree_to_arrays`).
      meta: JSON-able data.
      extra_files: ``{file name: writer(path)}`` for large optional parts.
      keep: how many checkpoints to keep, newest first.

    Raises:
      OSError: the checkpoint could not be written (its path named).
    """
    root = os.path.join(run_dir, "checkpoints")
    final = path_of(run_dir, step)
    tmp = os.path.join(root, f".tmp-step-{step:012d}-{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        for name, writer in (extra_files or {}).items():
            writer(os.path.join(tmp, name))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"format": FORMAT, "step": step, **meta}, f)
        fsync_tree(tmp)
        old = None
        if os.path.exists(final):  # same step saved twice (e.g. SIGINT right after a save)
            old = tmp + "-old"
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old:
                os.rename(old, final)
            raise
        fsync_dir(root)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror or str(e), final) from None
        raise
    # the oldest go; never the one just written, nor newer ones (a branch the caller set aside)
    older = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a checkpoint's arrays and meta; a damaged one raises CheckpointError.

    ``meta.json`` must be a JSON object of this format whose ``step`` is the
    step the directory is named after; the caller checks the rest of it
    (:func:`require`) before using any of it.
    """
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # missing files, bad zip, bad JSON: all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}/meta.json is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fdqn checkpoint (format {meta.get('format')!r})")
    step = require(meta, "step", int, path)
    match = _NAME.fullmatch(os.path.basename(path))
    if step < 0 or (match and int(match.group(1)) != step):
        raise CheckpointError(f"{path}/meta.json: step {step} does not match the directory name")
    return arrays, meta


_KINDS = {int: "an integer", bool: "true or false", dict: "an object", str: "a string",
          list: "a list"}  # fmt: skip


def require(meta: dict[str, Any], key: str, kind: type, path: str) -> Any:
    """``meta[key]``, which must be of JSON type ``kind`` (a non-negative one for int)."""
    value = meta.get(key) if isinstance(meta, dict) else None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and kind is int and value < 0:
        ok = False
    if not ok:
        what = "a non-negative integer" if kind is int else _KINDS.get(kind, kind.__name__)
        shown = "missing" if not isinstance(meta, dict) or key not in meta else repr(value)[:40]
        raise CheckpointError(f"{path}/meta.json: {key} must be {what}, got {shown}")
    return value


def restore_newest(
    run_dir: str, restore: Callable[[str], T], step: int | None = None
) -> tuple[str, T, list[tuple[str, str]]]:
    """Restores the newest checkpoint that ``restore(path)`` accepts.

    ``restore`` raises :class:`CheckpointError` for a damaged checkpoint; the
    next older one is then tried. Nothing is changed on disk. With ``step``,
    only that checkpoint is tried.

    Returns:
      ``(path, restore(path), skipped)``, ``skipped`` listing the damaged
      newer checkpoints as ``(path, reason)``.
    """
    if step is not None:
        path = path_of(run_dir, step)
        if not os.path.isdir(path):
            have = ", ".join(str(step_of(p)) for p in list_checkpoints(run_dir)) or "none"
            raise CheckpointError(f"{run_dir} has no checkpoint at step {step} (it has: {have})")
        return path, restore(path), []
    candidates = list_checkpoints(run_dir)[::-1]
    if not candidates:
        raise CheckpointError(f"{run_dir} has no checkpoint")
    skipped = []
    for path in candidates:
        try:
            return path, restore(path), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    raise CheckpointError(f"{run_dir} has no intact checkpoint; the newest: {skipped[0][1]}")


SET_ASIDE = "set-aside"


def set_aside(path: str) -> str:
    """Moves a checkpoint out of the run's list, into ``checkpoints/set-aside/``; returns where.

    For checkpoints a resume does not continue from (damaged ones, or newer
    ones when ``--checkpoint`` picks an older step): kept, never deleted,
    and no longer the newest.
    """
    folder = os.path.join(os.path.dirname(path), SET_ASIDE)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, os.path.basename(path))
    n = 1
    while os.path.exists(target):
        target = os.path.join(folder, f"{os.path.basename(path)}-{n}")
        n += 1
    os.rename(path, target)
    fsync_dir(os.path.dirname(path))
    return target
