"""Selects the JAX backend for Keras before Keras is first imported.

fdqn's networks are Keras 3 models run through ``stateless_call`` inside
``jax.jit``, which needs Keras' JAX backend. Keras reads its backend once, when
it is first imported, so the choice must be made here, before any fdqn module
imports Keras.
"""

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
    import importlib.util

    if any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS):
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
