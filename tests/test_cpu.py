"""Importing fdqn selects Keras' JAX backend and changes nothing else; fdqn.cpu tunes on request."""

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

from fdqn import cpu


def run(code, *args, **env_changes):
    drop = ("KERAS_BACKEND", "XLA_FLAGS", "GLIBC_TUNABLES", *cpu._MALLOC_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True
    )


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

ON_TESTED_CPU = importlib.metadata.version("jaxlib").startswith(cpu.TESTED_JAXLIB) and not any(
    importlib.util.find_spec(name) for name in cpu.ACCELERATOR_PLUGINS
)


@pytest.mark.skipif(not ON_TESTED_CPU, reason="fdqn sets XLA flags only on tested CPU jaxlibs")
def test_xla_flags_set_by_tune_when_the_user_has_none():
    result = run("import os, fdqn.cpu; t = fdqn.cpu.tune(); print(os.environ['XLA_FLAGS'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == cpu.XLA_FLAGS


@pytest.mark.parametrize("flags", ["", "--xla_cpu_enable_fast_math=false"])
def test_users_xla_flags_are_never_overridden(flags):
    code = "import os, fdqn.cpu; t = fdqn.cpu.tune(); print(repr(os.environ['XLA_FLAGS']))"
    result = run(code, XLA_FLAGS=flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(flags)


def test_no_flags_once_jax_has_started():
    code = "import jax; jax.numpy.zeros(1).block_until_ready(); import os, fdqn.cpu; "
    code += "t = fdqn.cpu.tune(); print(os.environ.get('XLA_FLAGS'), t.skipped)"
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("None") and "JAX had started" in result.stdout


NUMERICS = """
import sys, fdqn, fdqn.cpu
if sys.argv[2] == "tuned":
    fdqn.cpu.tune()
import jax, numpy as np
out = {}
for name in ("nature", "notebook"):
    model = fdqn.nature_cnn(4, seed=0) if name == "nature" else fdqn.notebook_cnn(4, seed=0)
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


@pytest.mark.slow
@pytest.mark.skipif(not ON_TESTED_CPU, reason="fdqn sets XLA flags only on tested CPU jaxlibs")
def test_xla_flags_keep_results_within_float32_tolerance(tmp_path):
    paths = {}
    for name in ("fdqn", "default"):
        paths[name] = str(tmp_path / f"{name}.npz")
        env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
        mode = "tuned" if name == "fdqn" else "default"
        result = subprocess.run(
            [sys.executable, "-c", NUMERICS, paths[name], mode],
            env=env,
            capture_output=True,
            text=True,
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
import json, re, sys
import fdqn, fdqn.cpu
if "tuned" in sys.argv:
    fdqn.cpu.tune()
import jax, numpy as np
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


@pytest.mark.slow
@pytest.mark.skipif(not ON_TESTED_CPU, reason="fdqn sets XLA flags only on tested CPU jaxlibs")
def test_xla_flags_keep_convolutions_out_of_ynnpack():
    # XLA's default hands convolutions and dots to YNNPACK; fdqn's flags keep the convolutions
    # on XLA's own kernels and give YNNPACK the dense layers' products, one fusion each
    default, ours = run(COMPILED), run(COMPILED, "tuned")
    assert default.returncode == 0 and ours.returncode == 0, default.stderr + ours.stderr
    default, ours = json.loads(default.stdout), json.loads(ours.stdout)
    assert default["convolutions"] == 3 and default["dots"] == 2, default
    assert ours == {"convolutions": 0, "dots": 2}, ours


# -- malloc ---------------------------------------------------------------------

ON_GLIBC_CPU = (
    sys.platform.startswith("linux")
    and platform.libc_ver()[0] == "glibc"
    and not any(importlib.util.find_spec(name) for name in cpu.ACCELERATOR_PLUGINS)
)
APPLIED = "import json, fdqn.cpu; print(json.dumps(fdqn.cpu.tune().malloc))"


@pytest.mark.skipif(not ON_GLIBC_CPU, reason="fdqn tunes malloc only with glibc, on the CPU")
def test_malloc_settings_applied_by_tune():
    result = run(APPLIED)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == cpu.MALLOC_SETTINGS


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TOP_PAD_": "0"},
        {"MALLOC_ARENA_MAX": "2"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
    ],
)
def test_malloc_left_alone_when_the_user_chooses(env):
    result = run(APPLIED, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is None


FAULTS = r"""
import json, resource, statistics, sys
import fdqn, fdqn.cpu
if sys.argv[1:] == ["tuned"]:
    fdqn.cpu.tune()
import jax, jax.numpy as jnp
x = jnp.ones((2560, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sort(x * 2.0, axis=0)[0])  # 40 MB of scratch: over glibc's 32 MB
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(4):  # every thread that may run the call has run it (and freed its scratch) once
    f(x).block_until_ready()
per_call = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"temp": temp, "faults": statistics.median(per_call)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not ON_GLIBC_CPU, reason="fdqn tunes malloc only with glibc, on the CPU")
def test_tuned_malloc_keeps_jitted_scratch_memory_mapped():
    # glibc's defaults map a fresh 40 MB for every call and fault each of its 10,240 pages in;
    # with fdqn's settings the freed block is reused from one call to the next
    system, tuned = run(FAULTS), run(FAULTS, "tuned")
    assert system.returncode == 0 and tuned.returncode == 0, system.stderr + tuned.stderr
    system, tuned = json.loads(system.stdout), json.loads(tuned.stdout)
    assert system["temp"] >= 40 * 2**20
    assert system["faults"] > 0.8 * system["temp"] / resource.getpagesize(), system
    assert tuned["faults"] < 0.1 * system["faults"], (tuned, system)


# -- importing fdqn changes nothing -------------------------------------------------

ENVIRONMENT = r"""
import json, os, sys
if sys.argv[1] == "fdqn":
    import fdqn
    from fdqn import q_learning
else:  # what fdqn's dependencies do on their own, with Keras on JAX
    import gymnasium, jax, numpy, optax, chex
    os.environ["KERAS_BACKEND"] = "jax"
    import keras
    del os.environ["KERAS_BACKEND"]
print(json.dumps({"env": dict(os.environ), "ale": any(m.startswith("ale_py") for m in sys.modules),
                  "keras": sys.modules["keras"].backend.backend()}))
"""


def test_import_changes_no_environment_variable_and_loads_no_emulator():
    ours, deps = run(ENVIRONMENT, "fdqn"), run(ENVIRONMENT, "deps")
    assert ours.returncode == 0 and deps.returncode == 0, ours.stderr + deps.stderr
    ours, deps = json.loads(ours.stdout), json.loads(deps.stdout)
    assert ours["keras"] == "jax"
    assert ours["env"] == deps["env"]  # nothing beyond what the dependencies set themselves
    for name in ("XLA_FLAGS", "KERAS_BACKEND", *cpu.MALLOC_SETTINGS_ENV):
        assert name not in ours["env"]
    assert not ours["ale"]


MMAPPED_BLOCKS = r"""
import ctypes, sys
import fdqn, fdqn.cpu
if sys.argv[1:] == ["tuned"]:
    fdqn.cpu.tune()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)  # over glibc's largest mmap threshold
print(libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(block))
"""


@pytest.mark.skipif(not ON_GLIBC_CPU, reason="mallinfo2 is glibc's")
def test_import_leaves_malloc_settings_alone():
    # glibc's defaults serve a 64 MB block with its own mmap; fdqn.cpu.tune (the control)
    # turns that off, and importing fdqn must not
    plain, tuned = run(MMAPPED_BLOCKS), run(MMAPPED_BLOCKS, "tuned")
    assert plain.returncode == 0 and tuned.returncode == 0, plain.stderr + tuned.stderr
    assert int(plain.stdout) == 1
    assert int(tuned.stdout) == 0
