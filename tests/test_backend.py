"""Importing fdqn selects Keras' JAX backend, or says why it cannot."""

import os
import subprocess
import sys

import pytest


def run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_import_selects_jax_backend():
    result = run("import fdqn, keras; print(keras.backend.backend())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "jax"


def test_keras_imported_with_another_backend_fails_with_one_line():
    result = run("import keras\nimport fdqn", KERAS_BACKEND="numpy")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "KerasBackendError" in last and "'numpy'" in last and "import fdqn before keras" in last


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_env_var_naming_another_backend_fails(backend):
    result = run("import fdqn", KERAS_BACKEND=backend)
    assert result.returncode != 0
    assert f"KERAS_BACKEND='{backend}'" in result.stderr.strip().splitlines()[-1]
