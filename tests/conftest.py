"""Shared fixtures: every pure function is tested both eagerly and under jax.jit."""

import jax
import pytest

import fdqn  # noqa: F401  (selects Keras' JAX backend before any test imports keras)


@pytest.fixture(params=["eager", "jit"])
def variant(request):
    """Wraps a function in ``jax.jit`` or leaves it as is."""
    if request.param == "jit":
        return jax.jit
    return lambda f, **kwargs: f
