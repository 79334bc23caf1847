"""Process settings fdqn makes on import, before Keras and JAX start.

fdqn's networks are Keras 3 models run through ``stateless_call`` inside
``jax.jit``, which needs Keras' JAX backend. Keras reads its backend once, when
it is first imported, so the choice must be made here, before any fdqn module
imports Keras. On a CPU-only install fdqn also sets XLA:CPU flags
(:func:`configure_xla`) and glibc malloc settings (:func:`configure_malloc`),
each only where the user has not chosen their own.
"""

import ctypes
import os
import sys


class KerasBackendError(ImportError):
    """Keras was configured or imported with a backend other than JAX."""


def ensure_jax_backend() -> None:
    """Makes Keras use JAX, or raises a one-line error saying how to fix it."""
    requested = os.environ.get("KERAS_BACKEND")
    if "keras" in sys.modules:
        import keras

        active = keras.backend.backend()
        if active != "jax":
            raise KerasBackendError(
                f"fdqn needs Keras' JAX backend, but Keras was already imported with "
                f"backend {active!r}: import fdqn before keras, or set KERAS_BACKEND=jax."
            )
        return
    if requested not in (None, "", "jax"):
        raise KerasBackendError(
            f"fdqn needs Keras' JAX backend, but KERAS_BACKEND={requested!r}: "
            f"unset it or set KERAS_BACKEND=jax."
        )
    os.environ["KERAS_BACKEND"] = "jax"


# XLA:CPU flags fdqn sets when the user has not set XLA_FLAGS: YNNPACK fusions
# for single matrix products only. By default jaxlib 0.10 hands convolutions
# and matrix products to YNNPACK, which runs the convolutions of the Nature and
# notebook networks at about half the speed of XLA's own (Eigen) kernels;
# without YNNPACK at all, products with a transposed operand (a dense layer's
# input gradient) run more than twice as slow as in YNNPACK. With the flag,
# updates are about 1.6-1.9x faster than with the defaults
# (benchmarks/compare.py, benchmarks/learner_update.py). tests/test_backend.py
# checks Q-values, losses and gradients stay within float32 tolerance of XLA's
# default path.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
# jaxlib releases the flags were measured and tested with. XLA aborts the
# process on a flag it does not know, and YNNPACK fusions have had
# miscompilations in other releases, so other versions get XLA's defaults.
TESTED_JAXLIB = ("0.10.",)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def configure_xla() -> str | None:
    """Sets :data:`CPU_XLA_FLAGS` in ``XLA_FLAGS`` where that is safe; returns what was set.

    Nothing is changed when ``XLA_FLAGS`` is already set (set it, even to an
    empty string, to choose XLA's own defaults), when an accelerator plugin is
    installed (the flags concern the CPU only), when jaxlib is not a tested
    release, or when JAX's backends already started (XLA reads its flags once).
    """
    if "XLA_FLAGS" in os.environ:
        return None
    import importlib.metadata

    if _accelerator_installed():
        return None
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not version.startswith(TESTED_JAXLIB):
        return None
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                return None
        except (ImportError, AttributeError):
            return None
    os.environ["XLA_FLAGS"] = CPU_XLA_FLAGS
    return CPU_XLA_FLAGS


def _accelerator_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


# glibc malloc settings fdqn applies when JAX runs on the CPU. XLA:CPU takes the
# scratch memory of each jitted call from malloc and frees it when the call
# ends. glibc serves blocks above its mmap threshold (at most 32 MB) with a
# fresh mmap and unmaps them on free, so a call with more scratch than that
# faults every page of it in again, each time: the notebook network's update
# (35 MB of scratch at batch 64) took ~9,600 page faults per call. With large
# blocks taken from the heap instead (no mmap), and freed memory kept for reuse
# (trim threshold, top pad), the scratch stays mapped from call to call:
# python benchmarks/learner_update.py compares both (rows ynn_each_dot and
# system_malloc of benchmarks/results/learner_update.txt). The price is the whole
# process's: large zero-filled arrays (calloc, np.zeros) come from the heap too,
# where glibc sometimes clears them page by page at allocation instead of leaving
# the pages unmapped until first written (benchmarks/zeros_residency.py).
MALLOC_SETTINGS = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 256 << 20, "M_TOP_PAD": 64 << 20}
# The same settings as glibc's environment variables, read when a process starts:
# for processes that do not import fdqn (the baselines of benchmarks/compare.py).
MALLOC_SETTINGS_ENV = {f"MALLOC_{k[2:]}_": str(v) for k, v in MALLOC_SETTINGS.items()}
# mallopt's parameter numbers, from glibc's malloc.h
_MALLOPT_PARAM = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_MAX": -4}
# environment variables through which glibc takes a user's own malloc tuning
_MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)
MALLOC_MODES = ("tuned", "system")
# what configure_malloc applied when fdqn was imported (None: nothing)
malloc_applied: dict[str, int] | None = None


def configure_malloc() -> dict[str, int] | None:
    """Applies :data:`MALLOC_SETTINGS` with glibc's ``mallopt`` where that is wanted; returns them.

    ``FDQN_MALLOC=system`` keeps glibc's own settings (``tuned``, the default,
    applies fdqn's). Nothing is changed either when the user tunes malloc
    through glibc's environment variables (``MALLOC_*_``, ``GLIBC_TUNABLES``),
    when an accelerator plugin is installed (scratch memory then lives on the
    device), or when the C library is not glibc.

    Raises:
      ValueError: ``FDQN_MALLOC`` is set to something else.
    """
    mode = os.environ.get("FDQN_MALLOC", "tuned")
    if mode not in MALLOC_MODES:
        raise ValueError(f"FDQN_MALLOC must be one of {MALLOC_MODES}, got {mode!r}")
    if mode == "system" or not sys.platform.startswith("linux"):
        return None
    if any(name in os.environ for name in _MALLOC_ENV):
        return None
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if _accelerator_installed():
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = {}
    for name, value in MALLOC_SETTINGS.items():
        if mallopt(_MALLOPT_PARAM[name], value) == 1:
            applied[name] = value
    return applied
