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
