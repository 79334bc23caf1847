"""Checkpoints: atomic, pickle-free, validated on load.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-NNNNNNNNNNNN`` holding
``arrays.npz`` (every array: parameters, optimizer state, PRNG keys, ...),
``meta.json`` (counters and other plain data) and optional extra files (the
replay memory, environment state). It is written under a temporary name and
renamed into place, so a crash never leaves a half-written checkpoint, and
only the newest ``keep`` are kept.
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

FORMAT = "fdqn.checkpoint/1"
_NAME = re.compile(r"step-(\d{12})")


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
    """Complete checkpoints of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.fullmatch(n))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save(
    run_dir: str,
    step: int,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    extra_files: dict[str, Callable[[str], None]] | None = None,
    keep: int = 3,
) -> str:
    """Writes a checkpoint atomically and prunes old ones; returns its path.

    Args:
      run_dir: the run directory.
      step: the agent step count, which names the checkpoint.
      arrays: named arrays (see :func:`tree_to_arrays`).
      meta: JSON-able data.
      extra_files: ``{file name: writer(path)}`` for large optional parts.
      keep: how many checkpoints to keep, newest first.
    """
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:012d}")
    tmp = os.path.join(root, f".tmp-step-{step:012d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        for name, writer in (extra_files or {}).items():
            writer(os.path.join(tmp, name))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"format": FORMAT, "step": step, **meta}, f)
        old = None
        if os.path.exists(final):  # same step saved twice (e.g. SIGINT right after a save)
            old = tmp + "-old"
            os.rename(final, old)
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a checkpoint's arrays and meta; a damaged one raises CheckpointError."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # missing files, bad zip, bad JSON: all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fdqn checkpoint (format {meta.get('format')!r})")
    return arrays, meta
