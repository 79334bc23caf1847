"""Selecting Keras' JAX backend, the one thing importing fdqn does to the process.

fdqn's networks are Keras 3 models run through ``stateless_call`` inside
``jax.jit``, which needs Keras' JAX backend. Keras reads its backend once, from
``KERAS_BACKEND`` (or ``~/.keras/keras.json``), when it is first imported, so
the choice is made here, before any fdqn module imports Keras. The variable is
set only for that import and then restored: the process's environment (and so
that of its child processes) is left as it was.
"""

import os
import sys


class KerasBackendError(ImportError):
    """Keras was configured or imported with a backend other than JAX."""


def ensure_jax_backend() -> None:
    """Imports Keras on its JAX backend, or raises a one-line error saying how to fix it."""
    if "keras" in sys.modules:
        import keras

        active = keras.backend.backend()
        if active != "jax":
            raise KerasBackendError(
                f"fdqn needs Keras' JAX backend, but Keras was already imported with "
                f"backend {active!r}: import fdqn before keras, or set KERAS_BACKEND=jax."
            )
        return
    requested = os.environ.get("KERAS_BACKEND")
    if requested not in (None, "", "jax"):
        raise KerasBackendError(
            f"fdqn needs Keras' JAX backend, but KERAS_BACKEND={requested!r}: "
            f"unset it or set KERAS_BACKEND=jax."
        )
    os.environ["KERAS_BACKEND"] = "jax"
    try:
        import keras  # noqa: F401  (reads KERAS_BACKEND now, and never again)
    finally:
        if requested is None:
            del os.environ["KERAS_BACKEND"]
        else:
            os.environ["KERAS_BACKEND"] = requested
