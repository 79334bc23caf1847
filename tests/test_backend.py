"""Importing fdqn selects Keras' JAX backend, or says why it cannot."""

import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest

from fdqn import _backend


def run(code, **env_changes):
    drop = ("KERAS_BACKEND", "XLA_FLAGS", "FDQN_MALLOC", "GLIBC_TUNABLES", *_backend._MALLOC_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
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


# -- malloc ---------------------------------------------------------------------

ON_GLIBC_CPU = (
    sys.platform.startswith("linux")
    and platform.libc_ver()[0] == "glibc"
    and not any(importlib.util.find_spec(name) for name in _backend._ACCELERATOR_PLUGINS)
)
APPLIED = "import json, fdqn; print(json.dumps(fdqn._backend.malloc_applied))"


@pytest.mark.skipif(not ON_GLIBC_CPU, reason="fdqn tunes malloc only with glibc, on the CPU")
def test_malloc_settings_applied_on_import():
    result = run(APPLIED)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == _backend.MALLOC_SETTINGS
    assert json.loads(run(APPLIED, FDQN_MALLOC="tuned").stdout) == _backend.MALLOC_SETTINGS


@pytest.mark.parametrize(
    "env",
    [
        {"FDQN_MALLOC": "system"},
        {"MALLOC_TOP_PAD_": "0"},
        {"MALLOC_ARENA_MAX": "2"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
    ],
)
def test_malloc_left_alone_when_the_user_chooses(env):
    result = run(APPLIED, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is None


def test_bad_fdqn_malloc_fails_with_one_line():
    result = run("import fdqn", FDQN_MALLOC="jemalloc")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "FDQN_MALLOC" in last and "'jemalloc'" in last and "'system'" in last


FAULTS = r"""
import json, resource, statistics
import fdqn, jax, jax.numpy as jnp
x = jnp.ones((2560, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sort(x * 2.0, axis=0)[0])  # 40 MB of scratch: over glibc's 32 MB
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(6):  # every thread that may run the call has run it (and freed its scratch) once
    f(x).block_until_ready()
per_call = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"temp": temp, "faults": statistics.median(per_call)}))
"""


@pytest.mark.skipif(not ON_GLIBC_CPU, reason="fdqn tunes malloc only with glibc, on the CPU")
def test_tuned_malloc_keeps_jitted_scratch_memory_mapped():
    # glibc's defaults map a fresh 40 MB for every call and fault each of its 10,240 pages in;
    # with fdqn's settings the freed block is reused from one call to the next
    system, tuned = run(FAULTS, FDQN_MALLOC="system"), run(FAULTS)
    assert system.returncode == 0 and tuned.returncode == 0, system.stderr + tuned.stderr
    system, tuned = json.loads(system.stdout), json.loads(tuned.stdout)
    assert system["temp"] >= 40 * 2**20
    assert system["faults"] > 0.8 * system["temp"] / resource.getpagesize(), system
    assert tuned["faults"] < 0.1 * system["faults"], (tuned, system)
