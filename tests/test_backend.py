"""Importing fdqn selects Keras' JAX backend, or says why it cannot."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fdqn import _backend


def run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
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


# -- XLA flags ------------------------------------------------------------------

ON_TESTED_CPU = importlib.metadata.version("jaxlib").startswith(_backend.TESTED_JAXLIB) and not any(
    importlib.util.find_spec(name) for name in _backend._ACCELERATOR_PLUGINS
)


@pytest.mark.skipif(not ON_TESTED_CPU, reason="fdqn sets XLA flags only on tested CPU jaxlibs")
def test_xla_flags_set_when_the_user_has_none():
    result = run("import os, fdqn; print(os.environ['XLA_FLAGS'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == _backend.CPU_XLA_FLAGS


@pytest.mark.parametrize("flags", ["", "--xla_cpu_enable_fast_math=false"])
def test_users_xla_flags_are_never_overridden(flags):
    result = run("import os, fdqn; print(repr(os.environ['XLA_FLAGS']))", XLA_FLAGS=flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(flags)


def test_no_flags_once_jax_has_started():
    code = "import jax; jax.numpy.zeros(1).block_until_ready(); import os, fdqn; "
    code += "print(os.environ.get('XLA_FLAGS'))"
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"


NUMERICS = """
import sys, jax, numpy as np, fdqn
out = {}
for name in ("nature", "notebook"):
    fdqn.seed_initializers(0)
    model = fdqn.nature_cnn(4) if name == "nature" else fdqn.notebook_cnn(4)
    state = fdqn.create_train_state(model, fdqn.make_optimizer("adam", 1e-4), jax.random.key(0))
    rng = np.random.default_rng(1)
    size = 32 if name == "nature" else 64
    batch = fdqn.Batch(
        obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        action=rng.integers(0, 4, size),
        reward=rng.choice(np.array([-1.0, 0.0, 1.0], np.float32), size),
        next_obs=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        terminated=rng.random(size) < 0.1,
    )
    fn = jax.jit(jax.value_and_grad(
        lambda p: fdqn.dqn_loss(p, state.target_params, state.q_fn, batch)[0]))
    loss, grads = fn(state.params)
    out[name + "/q"] = np.asarray(jax.jit(state.q_fn)(state.params, batch.obs))
    out[name + "/loss"] = np.asarray(loss)
    for i, g in enumerate(grads):
        out[f"{name}/grad{i}"] = np.asarray(g)
np.savez(sys.argv[1], **out)
"""


@pytest.mark.skipif(not ON_TESTED_CPU, reason="fdqn sets XLA flags only on tested CPU jaxlibs")
def test_xla_flags_keep_results_within_float32_tolerance(tmp_path):
    paths = {}
    for name, env in (("fdqn", {}), ("default", {"XLA_FLAGS": ""})):
        paths[name] = str(tmp_path / f"{name}.npz")
        env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")} | env
        result = subprocess.run(
            [sys.executable, "-c", NUMERICS, paths[name]], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
    ours, default = np.load(paths["fdqn"]), np.load(paths["default"])
    assert sorted(ours.files) == sorted(default.files) and len(ours.files) > 4
    for key in default.files:
        scale = float(np.max(np.abs(default[key]))) + 1e-12
        np.testing.assert_allclose(
            ours[key], default[key], rtol=1e-4, atol=1e-4 * scale, err_msg=key
        )


COMPILED = r"""
import json, re
import jax, numpy as np, fdqn
q_fn, params = fdqn.pure_q_fn(fdqn.nature_cnn(4))
obs = np.zeros((8, 4, 84, 84), np.uint8)
text = jax.jit(q_fn).lower(params, obs).compile().as_text()
bodies = dict(re.findall(r"^%?(\S+) [^\n]*\{\n(.*?)\n\}", text, re.S | re.M))
called = [c for line in text.splitlines() if "__ynn_fusion" in line
          for c in re.findall(r"calls=%([\w.\-]+)", line)]
print(json.dumps({
    "convolutions": sum("convolution(" in bodies.get(c, "") for c in called),
    "dots": sum(" dot(" in bodies.get(c, "") for c in called),
}))
"""


@pytest.mark.skipif(not ON_TESTED_CPU, reason="fdqn sets XLA flags only on tested CPU jaxlibs")
def test_xla_flags_keep_convolutions_out_of_ynnpack():
    # XLA's default hands convolutions and dots to YNNPACK; fdqn's flags keep the convolutions
    # on XLA's own kernels and give YNNPACK the dense layers' products, one fusion each
    default, ours = run(COMPILED, XLA_FLAGS=""), run(COMPILED)
    assert default.returncode == 0 and ours.returncode == 0, default.stderr + ours.stderr
    default, ours = json.loads(default.stdout), json.loads(ours.stdout)
    assert default["convolutions"] == 3 and default["dots"] == 2, default
    assert ours == {"convolutions": 0, "dots": 2}, ours
