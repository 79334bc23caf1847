"""Keras networks and their pure-function form."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import fdqn
import fdqn.cpu


def atari_obs(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 84, 84), dtype=np.uint8)


def test_nature_cnn_shapes_and_layers():
    model = fdqn.nature_cnn(6)
    assert model(atari_obs()).shape == (3, 6)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    assert shapes == [
        (8, 8, 4, 32), (32,), (4, 4, 32, 64), (64,), (3, 3, 64, 64), (64,),
        (3136, 512), (512,), (512, 6), (6,),
    ]  # fmt: skip


def test_notebook_cnn_matches_the_notebook_layout():
    model = fdqn.notebook_cnn(4)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    # 84 -> 40 -> 18 -> 7 with 5x5 stride-2 'valid' convolutions: 7 * 7 * 32 = 1568
    assert shapes == [
        (5, 5, 4, 16),
        (16,),
        (5, 5, 16, 32),
        (32,),
        (5, 5, 32, 32),
        (32,),
        (1568, 4),
        (4,),
    ]


def test_notebook_cnn_has_no_activations():
    # An affine network maps the midpoint of two inputs to the midpoint of their outputs.
    model = fdqn.notebook_cnn(4, scale_obs=False)
    q_fn, params = fdqn.pure_q_fn(model)
    x = atari_obs(1, seed=1).astype(np.int32) // 2 * 2
    y = atari_obs(1, seed=2).astype(np.int32) // 2 * 2
    mid = ((x + y) // 2).astype(np.uint8)
    qx, qy, qm = (np.asarray(q_fn(params, o.astype(np.uint8))) for o in (x, y, mid))
    np.testing.assert_allclose(qm, 0.5 * (qx + qy), rtol=1e-4, atol=1e-3)
    # The Nature CNN, with ReLUs, does not.
    nq_fn, nparams = fdqn.pure_q_fn(fdqn.nature_cnn(4))
    nx, ny, nm = (np.asarray(nq_fn(nparams, o.astype(np.uint8))) for o in (x, y, mid))
    assert not np.allclose(nm, 0.5 * (nx + ny), rtol=1e-4, atol=1e-4)


def test_notebook_cnn_scaling_is_a_factor_inside_the_model():
    raw = fdqn.notebook_cnn(4, scale_obs=False, seed=0)
    scaled = fdqn.notebook_cnn(4, scale_obs=True, seed=0)
    obs = atari_obs()
    zero = np.zeros_like(obs)
    # affine: q(x) - q(0) is linear in x, so scaling the input by 1/255 scales this by 1/255
    diff_raw = np.asarray(raw(obs)) - np.asarray(raw(zero))
    diff_scaled = np.asarray(scaled(obs)) - np.asarray(scaled(zero))
    np.testing.assert_allclose(diff_scaled, diff_raw / 255.0, rtol=1e-3, atol=1e-5)


def test_mlp_on_vectors():
    model = fdqn.mlp(2, obs_dim=4, hidden=(8, 8))
    out = model(np.zeros((5, 4), np.float32))
    assert out.shape == (5, 2)


def test_pure_q_fn_matches_model_with_and_without_jit():
    model = fdqn.nature_cnn(4)
    q_fn, params = fdqn.pure_q_fn(model)
    obs = atari_obs()
    expected = np.asarray(model(obs))
    np.testing.assert_allclose(q_fn(params, obs), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(q_fn)(params, obs), expected, rtol=1e-5, atol=1e-6)
    assert all(isinstance(p, jax.Array) for p in params)
    assert not any(isinstance(p, keras.Variable) for p in jax.tree.leaves(params))


def test_write_params_round_trip(tmp_path):
    model = fdqn.mlp(3, obs_dim=4)
    q_fn, params = fdqn.pure_q_fn(model)
    new_params = [p + 1.0 for p in params]
    fdqn.write_params(model, new_params)
    obs = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(model.predict(obs, verbose=0), q_fn(new_params, obs), rtol=1e-5)
    path = tmp_path / "q.weights.h5"
    model.save_weights(path)
    other = fdqn.mlp(3, obs_dim=4)
    other.load_weights(path)
    np.testing.assert_allclose(other(obs), q_fn(new_params, obs), rtol=1e-5)


def test_user_built_model_works_in_train_state():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)]
    )
    state = fdqn.create_train_state(model, fdqn.make_optimizer(), jax.random.key(0))
    batch = fdqn.Batch(
        obs=np.ones((4, 3), np.float32),
        action=np.array([0, 1, 0, 1]),
        reward=np.ones(4, np.float32),
        next_obs=np.zeros((4, 3), np.float32),
        terminated=np.zeros(4, bool),
    )
    state, metrics = fdqn.update(state, batch)
    assert np.isfinite(float(metrics["loss"]))


def test_errors():
    with pytest.raises(ValueError, match="num_actions must be a positive integer"):
        fdqn.nature_cnn(0)
    with pytest.raises(ValueError, match="observations of shape"):
        fdqn.nature_cnn(4, obs_shape=(84, 84))
    with pytest.raises(ValueError, match="obs_dim"):
        fdqn.mlp(2, obs_dim=0)
    with pytest.raises(TypeError, match="expected a keras.Model"):
        fdqn.pure_q_fn(lambda x: x)
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="is not built"):
        fdqn.pure_q_fn(unbuilt)
    model = fdqn.mlp(2, obs_dim=4)
    _, params = fdqn.pure_q_fn(model)
    with pytest.raises(ValueError, match="trainable variables"):
        fdqn.write_params(model, params[:-1])
    with pytest.raises(ValueError, match="has shape"):
        fdqn.write_params(model, [np.zeros((1, 1))] + params[1:])


@pytest.mark.parametrize("jit", [False, True])
def test_observations_of_the_wrong_shape_are_one_line_errors(jit):
    q_fn, params = fdqn.pure_q_fn(fdqn.nature_cnn(4))
    apply = jax.jit(q_fn) if jit else q_fn
    channels_last = np.zeros((2, 84, 84, 4), np.uint8)
    with pytest.raises(ValueError) as e:
        apply(params, channels_last)
    assert str(e.value) == (
        "observations have shape (2, 84, 84, 4); model 'nature_cnn' takes (batch, 4, 84, 84)"
    )
    with pytest.raises(ValueError, match=r"shape \(4, 84, 84\); model 'nature_cnn' takes"):
        apply(params, np.zeros((4, 84, 84), np.uint8))  # no batch axis
    assert apply(params, np.zeros((3, 4, 84, 84), np.uint8)).shape == (3, 4)
    # through the update: the batch's fields agree with each other, not with the model
    state = fdqn.create_train_state(
        fdqn.mlp(2, obs_dim=4), fdqn.make_optimizer(), jax.random.key(0)
    )
    batch = fdqn.Batch(
        obs=np.ones((4, 3), np.float32),
        action=np.zeros(4, np.int32),
        reward=np.ones(4, np.float32),
        next_obs=np.zeros((4, 3), np.float32),
        terminated=np.zeros(4, bool),
    )
    with pytest.raises(ValueError, match=r"shape \(4, 3\); model 'mlp' takes \(batch, 4\)"):
        fdqn.update(state, batch)


def test_models_without_a_keras_input_are_not_checked():
    class TwoLayers(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = keras.layers.Dense(8), keras.layers.Dense(2)

        def call(self, x, training=False):
            return self.out(self.hidden(x))

    model = TwoLayers()
    model(np.zeros((1, 3), np.float32))  # built by a call: no Input to check against
    q_fn, params = fdqn.pure_q_fn(model)
    assert jax.jit(q_fn)(params, np.ones((5, 3), np.float32)).shape == (5, 2)


@pytest.mark.parametrize(
    "build",
    [
        lambda seed: fdqn.mlp(2, obs_dim=4, hidden=(8, 8), seed=seed),
        lambda seed: fdqn.nature_cnn(4, seed=seed),
        lambda seed: fdqn.notebook_cnn(4, seed=seed),
    ],
)
def test_seed_fixes_initial_weights_and_each_layer_draws_its_own(build):
    first, again, other = ([np.asarray(w) for w in build(seed).get_weights()] for seed in (3, 3, 4))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    kernels = [w for w in first if w.ndim > 1]
    assert not np.array_equal(first[0], other[0])
    # Glorot-uniform kernels within their limit sqrt(6 / (fan_in + fan_out)), zero biases
    for kernel in kernels:
        fan_in, fan_out = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
        receptive = int(np.prod(kernel.shape[:-2])) if kernel.ndim == 4 else 1
        if kernel.ndim == 4:
            fan_in, fan_out = kernel.shape[-2] * receptive, kernel.shape[-1] * receptive
        assert np.max(np.abs(kernel)) <= np.sqrt(6 / (fan_in + fan_out)) + 1e-7
    assert all(np.all(w == 0) for w in first if w.ndim == 1)
    first_rows = [k.ravel()[:8] for k in kernels]
    assert len({r.tobytes() for r in first_rows}) == len(kernels)  # no two layers alike


def test_bad_seed_is_a_one_line_error():
    for seed in (1.5, -1, True):
        with pytest.raises(ValueError, match="seed must be a non-negative integer or None"):
            fdqn.mlp(2, obs_dim=4, seed=seed)


def test_building_networks_does_not_import_tensorflow():
    code = "import sys, fdqn; fdqn.nature_cnn(4, seed=0); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _same_weights(plain, rewritten, x):
    """Builds both layers for ``x``, gives ``rewritten`` the weights of ``plain``; returns them."""
    plain.build(x.shape)
    rewritten.build(x.shape)
    rewritten.set_weights(plain.get_weights())
    return [jnp.asarray(w) for w in plain.get_weights()]


@pytest.mark.parametrize(
    "size, channels, filters, kernel, stride",
    [
        (84, 4, 32, 8, 4),  # the Nature CNN's first layer
        (20, 32, 64, 4, 2),  # its second
        (84, 4, 16, 5, 2),  # kernel not a multiple of the stride
        (83, 3, 8, 5, 3),  # size not a multiple of the stride: the kernel reaches past it
        (9, 2, 4, 3, 2),
        (9, 64, 64, 3, 1),  # the Nature CNN's third: stride 1
        (10, 3, 4, (2, 3), 1),
    ],
)
@pytest.mark.parametrize("forward", ["direct", "space_to_depth"])
def test_space_to_depth_conv_matches_conv2d(
    size, channels, filters, kernel, stride, forward, variant
):
    plain = keras.layers.Conv2D(filters, kernel, strides=stride, activation="relu")
    s2d = fdqn.cpu.CpuConv2D(filters, kernel, strides=stride, activation="relu", forward=forward)
    x = np.random.default_rng(0).normal(size=(3, size, size + 1, channels)).astype(np.float32)
    weights = _same_weights(plain, s2d, x)

    def apply(layer):
        def f(w, x):
            return layer.stateless_call(w, [], x)[0]

        return f

    want = variant(apply(plain))(weights, x)
    got = variant(apply(s2d))(weights, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # and the gradients with respect to kernel, bias and input
    def grads(layer):
        return jax.grad(lambda w, x: jnp.sum(jnp.sin(apply(layer)(w, x))), argnums=(0, 1))

    (gw_want, gx_want), (gw_got, gx_got) = grads(plain)(weights, x), grads(s2d)(weights, x)
    for a, b in zip([*gw_got, gx_got], [*gw_want, gx_want]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


def test_matmul_values_and_gradients_by_hand(variant):
    x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    kernel = jnp.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])
    np.testing.assert_array_equal(
        variant(fdqn.cpu.matmul)(x, kernel), [[-1.0, 2.0, 3.0], [4.0, -1.0, 5.5]]
    )
    # d/d kernel of sum(weights * x @ kernel) = x^T weights; d/d x = weights kernel^T
    weights = jnp.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    gx, gk = variant(
        jax.grad(lambda x, k: jnp.sum(weights * fdqn.cpu.matmul(x, k)), argnums=(0, 1))
    )(x, kernel)
    np.testing.assert_array_equal(gk, [[1.0, 6.0, 1.0], [2.0, -2.0, 2.0]])
    np.testing.assert_array_equal(gx, [[3.0, -0.5], [0.0, 2.0]])


def test_cpu_dense_matches_dense_and_falls_back_on_other_inputs(variant):
    plain = keras.layers.Dense(5, activation="relu")
    layer = fdqn.cpu.CpuDense(5, activation="relu")
    x = np.random.default_rng(5).normal(size=(4, 7)).astype(np.float32)
    weights = _same_weights(plain, layer, x)

    def grads(layer):
        def f(w, x):
            return jnp.sum(jnp.sin(layer.stateless_call(w, [], x)[0]))

        return variant(jax.grad(f, argnums=(0, 1)))(weights, x)

    for a, b in zip(jax.tree.leaves(grads(layer)), jax.tree.leaves(grads(plain))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda w, x: layer.stateless_call(w, [], x)[0])(weights, x))
    assert jaxpr.count("custom_vjp_call") == 2  # matmul and bias_add
    # a 3-D input is Dense's own
    x3 = np.random.default_rng(6).normal(size=(2, 3, 7)).astype(np.float32)
    np.testing.assert_allclose(layer(x3), plain(x3), rtol=1e-5, atol=1e-6)


def test_bias_add_values_and_gradients_by_hand(variant):
    x = jnp.arange(12.0).reshape(2, 2, 3)
    bias = jnp.array([10.0, 20.0, 30.0])
    np.testing.assert_array_equal(variant(fdqn.cpu.bias_add)(x, bias), x + bias)
    # d/d bias of sum(weights * (x + bias)): the weights summed over all but the last axis
    weights = jnp.array([[[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]], [[3.0, 0.0, 0.0], [1.0, -1.0, 0.5]]])
    gx, gb = variant(
        jax.grad(lambda x, b: jnp.sum(weights * fdqn.cpu.bias_add(x, b)), argnums=(0, 1))
    )(x, bias)
    np.testing.assert_array_equal(gb, [6.0, 0.0, 2.5])
    np.testing.assert_array_equal(gx, weights)


def test_bias_add_gradient_matches_the_broadcast_sum_on_a_layer_sized_input(variant):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(64, 40, 40, 16)).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=16).astype(np.float32))
    probe = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))

    def loss(add):
        return lambda x, b: jnp.sum(jnp.sin(add(x, b)) * probe)

    want = jax.grad(loss(jnp.add), argnums=(0, 1))(x, bias)
    got = variant(jax.grad(loss(fdqn.cpu.bias_add), argnums=(0, 1)))(x, bias)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-3)


def test_space_to_depth_conv_without_bias_matches_conv2d():
    plain = keras.layers.Conv2D(4, 5, strides=2, use_bias=False)
    layer = fdqn.cpu.CpuConv2D(4, 5, strides=2, use_bias=False)
    x = np.random.default_rng(4).normal(size=(2, 13, 13, 3)).astype(np.float32)
    plain.build(x.shape)
    layer.build(x.shape)
    layer.set_weights(plain.get_weights())
    assert len(layer.trainable_variables) == 1
    np.testing.assert_allclose(layer(x), plain(x), rtol=1e-5, atol=1e-5)


def test_space_to_depth_conv_falls_back_where_the_rewrite_does_not_apply():
    layer = fdqn.cpu.CpuConv2D(4, 3, strides=2, padding="same")
    plain = keras.layers.Conv2D(4, 3, strides=2, padding="same")
    x = np.random.default_rng(1).normal(size=(2, 7, 7, 3)).astype(np.float32)
    layer.build(x.shape)
    plain.build(x.shape)
    layer.set_weights(plain.get_weights())
    np.testing.assert_allclose(layer(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forward", ["direct", "space_to_depth"])
@pytest.mark.parametrize(
    "kernel, stride", [((5, 5), (2, 2)), ((8, 8), (4, 4)), ((3, 4), (2, 3)), ((3, 2), (1, 1))]
)
def test_strided_conv_values_and_gradients_match_xla_convolution(kernel, stride, forward, variant):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 23, 21, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(*kernel, 3, 5)).astype(np.float32))

    def reference(x, w):
        return jax.lax.conv_general_dilated(
            x, w, stride, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def ours(x, w):
        return fdqn.cpu.conv2d(x, w, stride, forward)

    # hand-worked: a 1x1 kernel of ones over one channel, stride 2, picks every other pixel
    ones = jnp.ones((1, 1, 1, 1))
    grid = jnp.arange(25.0).reshape(1, 5, 5, 1)
    np.testing.assert_array_equal(
        fdqn.cpu.conv2d(grid, ones, (2, 2), forward)[0, :, :, 0],
        [[0.0, 2.0, 4.0], [10.0, 12.0, 14.0], [20.0, 22.0, 24.0]],
    )

    np.testing.assert_allclose(variant(ours)(x, w), reference(x, w), rtol=1e-5, atol=1e-4)
    # the space-to-depth form the input gradient is taken through computes the same values
    np.testing.assert_allclose(
        fdqn.cpu._space_to_depth_conv(x, w, stride), reference(x, w), rtol=1e-5, atol=1e-4
    )
    probe = jnp.asarray(rng.normal(size=reference(x, w).shape).astype(np.float32))
    want = jax.grad(lambda x, w: jnp.sum(reference(x, w) * probe), argnums=(0, 1))(x, w)
    got = variant(jax.grad(lambda x, w: jnp.sum(ours(x, w) * probe), argnums=(0, 1)))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


def _convolutions(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if " convolution(" in line]


@pytest.mark.parametrize("network", ["nature", "notebook"])
def test_cpu_model_gradients_in_a_loop_are_convolutions_in_xla_cpus_eigen_form(network):
    # XLA:CPU gives only b01f_01io->b01f convolutions to its fast kernels and
    # rewrites other forms into it outside loop bodies only; an update inside a
    # fori_loop must therefore contain no other form
    build = {"nature": fdqn.nature_cnn, "notebook": fdqn.notebook_cnn}[network]
    q_fn, params = fdqn.pure_q_fn(fdqn.cpu.cpu_model(build(4, seed=0)))
    obs = jnp.asarray(atari_obs())

    def step(_, p):
        grads = jax.grad(lambda p: jnp.sum(q_fn(p, obs) ** 2))(p)
        return jax.tree.map(lambda a, g: a - 1e-3 * g, p, grads)

    looped = jax.jit(lambda p: jax.lax.fori_loop(0, 2, step, p))
    hlo = looped.lower(params).compile().as_text()
    convolutions = _convolutions(hlo)
    # three layers: three forward, three kernel-gradient and two input-gradient
    # convolutions (the first layer's input needs none)
    assert len(convolutions) == 8
    assert all("dim_labels=b01f_01io->b01f" in line for line in convolutions), [
        line.split("dim_labels=")[1].split(",")[0] for line in convolutions
    ]
    # and the loop computes what two plain gradient steps compute
    want = step(1, step(0, params))
    for a, b in zip(looped(params), want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_space_to_depth_conv_forward_choice_is_checked_and_kept_in_its_config():
    with pytest.raises(ValueError, match="forward must be one of .*'direct', 'space_to_depth'"):
        fdqn.cpu.CpuConv2D(4, 5, strides=2, forward="im2col")
    x = jnp.zeros((1, 9, 9, 2))
    with pytest.raises(ValueError, match="forward must be one of"):
        fdqn.cpu.conv2d(x, jnp.zeros((3, 3, 2, 4)), (2, 2), "fft")
    # the choice reaches the computation: a stride-1 convolution, or XLA's strided one
    for forward, strides in (("space_to_depth", "(1, 1)"), ("direct", "(2, 2)")):
        jaxpr = str(
            jax.make_jaxpr(fdqn.cpu.conv2d, static_argnums=(2, 3))(
                x, jnp.zeros((3, 3, 2, 4)), (2, 2), forward
            )
        )
        assert f"window_strides={strides}" in jaxpr
    layer = fdqn.cpu.CpuConv2D(4, 5, strides=2, forward="space_to_depth")
    clone = fdqn.cpu.CpuConv2D.from_config(layer.get_config())
    assert clone.forward == "space_to_depth"
    # the notebook network's first layer, with 4 input channels, takes the
    # space-to-depth forward pass; the other strided layers XLA's own
    forwards = {
        layer.name: layer.forward
        for layer in fdqn.cpu.cpu_model(fdqn.notebook_cnn(4)).layers
        if isinstance(layer, fdqn.cpu.CpuConv2D)
    }
    assert forwards == {"conv1": "space_to_depth", "conv2": "direct", "conv3": "direct"}


def test_space_to_depth_conv_takes_its_own_input_gradient():
    layer = fdqn.cpu.CpuConv2D(4, 5, strides=2)
    x = np.zeros((1, 11, 11, 2), np.float32)
    layer.build(x.shape)
    weights = [jnp.asarray(w) for w in layer.get_weights()]
    jaxpr = str(jax.make_jaxpr(lambda w, x: layer.stateless_call(w, [], x)[0])(weights, x))
    # strided_conv and bias_add, each with its own gradient
    assert jaxpr.count("custom_vjp_call") == 2


@pytest.mark.parametrize("network", ["nature", "notebook"])
def test_cpu_model_agrees_with_the_stock_network(network):
    build = {"nature": fdqn.nature_cnn, "notebook": fdqn.notebook_cnn}[network]
    reference = build(4, seed=0)
    assert {type(layer).__name__ for layer in reference.layers} <= {
        "Rescaling", "Permute", "Conv2D", "Flatten", "Dense"
    }  # fmt: skip
    model = fdqn.cpu.cpu_model(reference)
    convolutions = [n.name for n in reference.layers if type(n).__name__ == "Conv2D"]
    assert all(isinstance(model.get_layer(n), fdqn.cpu.CpuConv2D) for n in convolutions)
    assert len(convolutions) == 3
    dense = [n.name for n in reference.layers if type(n).__name__ == "Dense"]
    assert all(isinstance(model.get_layer(n), fdqn.cpu.CpuDense) for n in dense)
    assert model.get_layer("q_values").dtype_policy.name == "float32"
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    obs = atari_obs()
    np.testing.assert_allclose(model(obs), reference(obs), rtol=1e-4, atol=1e-5)

    # gradients of a TD-style loss with respect to every parameter agree too
    q_ref, params = fdqn.pure_q_fn(reference)
    q_fn, _ = fdqn.pure_q_fn(model)

    def loss(q):
        return lambda p: jnp.mean(jnp.sin(q(p, obs)))

    want = jax.grad(loss(q_ref))(params)
    got = jax.jit(jax.grad(loss(q_fn)))(params)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(b))))


def _mixed_and_float32(network):
    """The same network (same weights) built under both dtype policies."""
    build = {
        "nature": lambda policy: fdqn.nature_cnn(4, dtype_policy=policy),
        "notebook": lambda policy: fdqn.notebook_cnn(4, dtype_policy=policy),
        "mlp": lambda policy: fdqn.mlp(2, obs_dim=4, dtype_policy=policy),
    }[network]
    reference = build("float32")
    mixed = build("mixed_bfloat16")
    mixed.set_weights([np.asarray(v.value) for v in reference.weights])
    if network == "mlp":
        obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    else:
        obs = atari_obs()
    return reference, mixed, obs


@pytest.mark.parametrize("network", ["nature", "notebook", "mlp"])
@pytest.mark.parametrize("jit", [False, True])
def test_mixed_bfloat16_computes_in_bfloat16_with_float32_params_and_q_values(network, jit):
    reference, mixed, obs = _mixed_and_float32(network)
    q_ref, params = fdqn.pure_q_fn(reference)
    q_mixed, mixed_params = fdqn.pure_q_fn(mixed)
    assert all(p.dtype == jnp.float32 for p in mixed_params)
    apply = jax.jit(q_mixed) if jit else q_mixed
    got, want = apply(params, obs), q_ref(params, obs)
    assert got.dtype == jnp.float32
    # bfloat16 keeps 8 significant bits: a few parts in a thousand per layer
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.03 * scale)
    assert not np.array_equal(got, want)  # the layers did compute in bfloat16
    jaxpr = str(jax.make_jaxpr(q_mixed)(params, obs))
    assert "bf16" in jaxpr
    # the output layer runs in float32: its product takes float32 operands
    last_dot = [line for line in jaxpr.splitlines() if "dot_general" in line][-1]
    assert "bf16" not in last_dot.split("=", 1)[0]


@pytest.mark.parametrize("network", ["nature", "mlp"])
def test_mixed_bfloat16_update_keeps_float32_state_and_a_close_loss(network):
    reference, mixed, obs = _mixed_and_float32(network)
    rng = np.random.default_rng(1)
    n, actions = len(obs), 4 if network == "nature" else 2
    batch = fdqn.Batch(
        obs=obs,
        action=rng.integers(0, actions, n),
        reward=rng.normal(size=n).astype(np.float32),
        next_obs=obs[::-1].copy(),
        terminated=np.arange(n) == 0,
    )
    opt = fdqn.make_optimizer("adam", 1e-3)
    states = [fdqn.create_train_state(m, opt, jax.random.key(0)) for m in (reference, mixed)]
    (ref_state, ref_metrics), (state, metrics) = [fdqn.update(s, batch) for s in states]
    assert metrics["loss"].dtype == jnp.float32
    leaves = jax.tree.leaves((state.params, state.target_params, state.opt_state))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=0.05)
    # gradient directions agree: Adam's first step moves each weight by about lr * sign(grad)
    moved = [a - b for a, b in zip(state.params, states[1].params)]
    ref_moved = [a - b for a, b in zip(ref_state.params, states[0].params)]
    same_sign = np.mean(
        np.concatenate([np.sign(a).ravel() == np.sign(b).ravel() for a, b in zip(moved, ref_moved)])
    )
    assert same_sign > 0.9


def test_dtype_policy_errors():
    for build in (fdqn.nature_cnn, fdqn.notebook_cnn):
        with pytest.raises(ValueError, match=r"dtype_policy must be one of \('float32'"):
            build(4, dtype_policy="float16")
    with pytest.raises(ValueError, match="dtype_policy must be one of"):
        fdqn.mlp(2, obs_dim=4, dtype_policy="bfloat16")


def test_minatar_cnn_maps_grids_to_q_values_and_refuses_other_shapes():
    model = fdqn.networks.minatar_cnn(6, (10, 10, 7), seed=0)
    q = model(np.ones((3, 10, 10, 7), np.float32))
    assert q.shape == (3, 6) and q.dtype == "float32"
    # conv 16 3x3 'valid' on 10x10 leaves 8x8x16 = 1024 inputs to the dense layer of 128
    assert [tuple(w.shape) for w in model.weights] == [
        (3, 3, 7, 16), (16,), (1024, 128), (128,), (128, 6), (6,)
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"obs_shape must be \(height, width, channels\)"):
        fdqn.networks.minatar_cnn(6, (4, 84, 84, 1))
