"""Q-networks as Keras 3 models, and their conversion to pure JAX functions.

Pixel networks take the observations the Atari environments give, uint8 of
shape ``(N, stack, 84, 84)`` (channels first), and do the scaling and layout
change inside the model, so callers never preprocess by hand. Vector networks
take float observations of shape ``(N, obs_dim)``.

Any ``keras.Model`` mapping observations to ``(N, num_actions)`` Q-values can
be used in place of these: :func:`pure_q_fn` turns it into
``q_fn(params, obs) -> q_values`` over plain arrays, and :func:`write_params`
copies trained parameters back into the model (to call ``model.predict`` or
``model.save_weights``).
"""

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

Params = list  # the model's trainable arrays, in ``model.trainable_variables`` order
QFn = Callable[[Params, jax.Array], jax.Array]

ATARI_OBS_SHAPE = (4, 84, 84)
# Keras dtype policies the networks take: float32 throughout, or bfloat16 compute
# with float32 variables ("mixed_bfloat16"), the Q-value layer staying float32.
DTYPE_POLICIES = ("float32", "mixed_bfloat16")


def seed_initializers(seed: int) -> None:
    """Makes the weights of networks built next a function of ``seed``.

    Does what ``keras.utils.set_random_seed`` does for Keras on JAX (seeds
    Python's and NumPy's global generators, from which Keras draws the seeds
    of unseeded initializers, and resets Keras' global ``SeedGenerator``)
    but not its last step: that function imports TensorFlow whenever it is
    installed, to seed it too (seconds, hundreds of MB, log lines on stderr).
    """
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    try:
        from keras.src.backend.common import global_state
        from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
        from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED
    except ImportError:  # a Keras whose internals moved: the public call, side effects and all
        keras.utils.set_random_seed(int(seed))
        return
    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, int(seed))
    global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)
    random.seed(int(seed))
    np.random.seed(int(seed))  # noqa: NPY002  (the global generator, as Keras seeds it)


def _direct_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _space_to_depth_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """The same convolution as ``_direct_conv``, as space-to-depth + a stride-1 convolution.

    The kernel is zero-padded to a whole number of ``sh x sw`` blocks, kernel
    and input are cut into those blocks and the blocks stacked along channels;
    a stride-1 convolution with a ``ceil(k / s)``-sized kernel does the rest.
    """
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    bh, bw = -(-kh // sh), -(-kw // sw)  # kernel size in blocks
    cin, cout = kernel.shape[2], kernel.shape[3]
    kernel = jnp.pad(kernel, ((0, bh * sh - kh), (0, bw * sw - kw), (0, 0), (0, 0)))
    kernel = kernel.reshape(bh, sh, bw, sw, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    kernel = kernel.reshape(bh, bw, sh * sw * cin, cout)
    n, h, w, c = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    # rows and columns the zero-padded kernel reaches: a whole number of blocks
    nh, nw = (oh - 1) * sh + bh * sh, (ow - 1) * sw + bw * sw
    x = x[:, : min(h, nh), : min(w, nw)]
    if nh > h or nw > w:  # only zero taps reach these
        x = jnp.pad(x, ((0, 0), (0, max(0, nh - h)), (0, max(0, nw - w)), (0, 0)))
    x = x.reshape(n, nh // sh, sh, nw // sw, sw, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, nh // sh, nw // sw, sh * sw * c)
    return _direct_conv(x, kernel, (1, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], forward: str = "direct"
) -> jax.Array:
    """A 'valid' strided convolution (NHWC input, HWIO kernel) with a faster input gradient.

    Values, and both gradients, are those of ``jax.lax.conv_general_dilated``
    up to float32 rounding. The kernel gradient is XLA's own. The gradient
    with respect to ``x`` is taken through the space-to-depth form of the same
    convolution, where it is a stride-1 convolution: XLA emits a convolution
    with a dilated input for it otherwise, which XLA:CPU runs 1.4-4x slower
    (``benchmarks/space_to_depth.py``).

    Args:
      x: ``(N, H, W, C)`` input.
      kernel: ``(kh, kw, C, F)`` kernel.
      strides: ``(sh, sw)``, static.
      forward: how the forward pass is computed, static: ``"direct"`` (XLA's
        strided convolution) or ``"space_to_depth"`` (the stride-1 form; on
        XLA:CPU faster only for some shapes, such as a first layer with few
        input channels and a kernel that is not a multiple of the stride).

    Returns:
      ``(N, (H - kh) // sh + 1, (W - kw) // sw + 1, F)``.
    """
    return _forward_fn(forward)(x, kernel, strides)


_FORWARDS = {"direct": _direct_conv, "space_to_depth": _space_to_depth_conv}


def _forward_fn(forward: str):
    if forward not in _FORWARDS:
        raise ValueError(f"forward must be one of {tuple(_FORWARDS)}, got {forward!r}")
    return _FORWARDS[forward]


def _strided_conv_fwd(x, kernel, strides, forward):
    return _forward_fn(forward)(x, kernel, strides), (x, kernel)


def _strided_conv_bwd(strides, forward, residuals, g):
    x, kernel = residuals
    (d_kernel,) = jax.vjp(lambda k: _direct_conv(x, k, strides), kernel)[1](g)
    (d_x,) = jax.vjp(lambda v: _space_to_depth_conv(v, kernel, strides), x)[1](g)
    return d_x, d_kernel


strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


@jax.custom_vjp
def bias_add(x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x + bias`` over the last axis, with the bias gradient as a matrix-vector product.

    The gradient with respect to ``bias`` sums the cotangent over every axis
    but the last. XLA:CPU runs that reduction as an elementwise loop, about 4x
    slower than the same sum as a product with a vector of ones (1.6 against
    0.4 ms for the notebook network's first layer, 64x40x40x16), which is how
    it is computed here. Values and gradients are those of ``x + bias`` up to
    float32 rounding.

    Args:
      x: ``(..., F)`` array.
      bias: ``(F,)`` array.

    Returns:
      ``x + bias``, shaped like ``x``.
    """
    return x + bias


def _bias_add_fwd(x, bias):
    return x + bias, None


def _bias_add_bwd(_, g):
    rows = g.reshape(-1, g.shape[-1])
    ones = jnp.ones((rows.shape[0],), rows.dtype)
    # HIGHEST: GPUs that round float32 products to TF32 by default keep full precision
    return g, jnp.dot(ones, rows, precision=jax.lax.Precision.HIGHEST)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


@keras.saving.register_keras_serializable(package="fdqn")
class SpaceToDepthConv2D(keras.layers.Conv2D):
    """A ``Conv2D`` whose strided convolution is :func:`strided_conv`.

    Same weights, outputs and gradients (up to float32 rounding) as
    ``keras.layers.Conv2D``; the input gradient is computed differently,
    through the space-to-depth form of the convolution, which XLA:CPU runs
    several times faster, and so is the forward pass with
    ``forward="space_to_depth"`` (faster only for some shapes). The bias is
    added by :func:`bias_add`, whose gradient XLA:CPU also computes faster.
    Applies to ``padding="valid"``, ``channels_last``, no dilation, no
    groups, strides other than 1, on the JAX backend; other settings fall
    back to ``Conv2D``.

    Args:
      *args, **kwargs: those of ``keras.layers.Conv2D``.
      forward: how the forward pass is computed, as in :func:`strided_conv`:
        ``"direct"`` (the default) or ``"space_to_depth"``.
    """

    def __init__(self, *args, forward: str = "direct", **kwargs):
        _forward_fn(forward)  # a one-line error for an unknown value
        super().__init__(*args, **kwargs)
        self.forward = forward

    def get_config(self) -> dict:
        return {**super().get_config(), "forward": self.forward}

    def _rewrite_applies(self) -> bool:
        return (
            keras.backend.backend() == "jax"
            and self.padding == "valid"
            and self.data_format == "channels_last"
            and tuple(self.dilation_rate) == (1, 1)
            and self.groups == 1
            and tuple(self.strides) != (1, 1)
        )

    def call(self, inputs):
        if not (self.use_bias and self._rewrite_applies()):
            return super().call(inputs)
        # Conv2D.call with the bias added by bias_add, whose gradient XLA:CPU computes faster
        outputs = self.convolution_op(inputs, self.kernel)
        outputs = bias_add(outputs, keras.ops.convert_to_tensor(self.bias))
        return outputs if self.activation is None else self.activation(outputs)

    def convolution_op(self, inputs, kernel):
        if not self._rewrite_applies():
            return super().convolution_op(inputs, kernel)
        kernel = keras.ops.convert_to_tensor(kernel)  # a keras.Variable when called eagerly
        return strided_conv(inputs, kernel, tuple(int(s) for s in self.strides), self.forward)


def _strided_conv_layer(space_to_depth: bool | None) -> Callable[..., keras.layers.Conv2D]:
    """A constructor of strided convolution layers; ``None`` picks SpaceToDepthConv2D on the CPU.

    The constructor takes ``Conv2D``'s arguments and :class:`SpaceToDepthConv2D`'s
    ``forward``, which plain ``Conv2D`` layers ignore.
    """
    if space_to_depth is None:
        space_to_depth = jax.default_backend() == "cpu"

    def make(*args, forward: str = "direct", **kwargs) -> keras.layers.Conv2D:
        if space_to_depth:
            return SpaceToDepthConv2D(*args, forward=forward, **kwargs)
        return keras.layers.Conv2D(*args, **kwargs)

    return make


def _pixel_stem(
    obs_shape: Sequence[int], scale_obs: bool, dtype_policy: str
) -> list[keras.layers.Layer]:
    """Input, scaling to [0, 1] and a channels-first to channels-last transpose."""
    if len(obs_shape) != 3:
        raise ValueError(
            f"pixel networks take observations of shape (stack, height, width), got {obs_shape}"
        )
    return [
        keras.Input(shape=tuple(obs_shape), dtype="uint8", name="obs"),
        keras.layers.Rescaling(1.0 / 255.0 if scale_obs else 1.0, name="scale", dtype=dtype_policy),
        keras.layers.Permute((2, 3, 1), name="channels_last", dtype=dtype_policy),
    ]


def _check_dtype_policy(dtype_policy: str) -> None:
    if dtype_policy not in DTYPE_POLICIES:
        raise ValueError(f"dtype_policy must be one of {DTYPE_POLICIES}, got {dtype_policy!r}")


def _q_values_layer(num_actions: int) -> keras.layers.Dense:
    """The output layer: float32 under every policy, so Q-values and the TD loss are float32."""
    return keras.layers.Dense(num_actions, name="q_values", dtype="float32")


def _check_num_actions(num_actions: int) -> None:
    if not isinstance(num_actions, (int, np.integer)) or num_actions < 1:
        raise ValueError(f"num_actions must be a positive integer, got {num_actions!r}")


def nature_cnn(
    num_actions: int,
    obs_shape: Sequence[int] = ATARI_OBS_SHAPE,
    space_to_depth: bool | None = None,
    dtype_policy: str = "float32",
) -> keras.Model:
    """The DQN network of Mnih et al. (2015, Nature), with ReLU activations.

    Conv 32 8x8 stride 4, conv 64 4x4 stride 2, conv 64 3x3 stride 1, dense 512,
    dense ``num_actions``. Pixels are scaled to [0, 1] inside the model.

    Args:
      num_actions: size of the discrete action space.
      obs_shape: shape of one observation, ``(stack, height, width)``, uint8.
      space_to_depth: make the two strided convolutions
        :class:`SpaceToDepthConv2D` (same weights, outputs and gradients, a
        faster input gradient); ``None`` does so when JAX runs on the CPU.
      dtype_policy: one of :data:`DTYPE_POLICIES`. ``"mixed_bfloat16"`` keeps
        the variables (and so the parameters, gradients and optimizer state)
        float32 and computes every layer but the last in bfloat16, for
        accelerators with bfloat16 matrix units; the Q-value layer computes in
        float32. Q-values differ from float32 ones by bfloat16 rounding: up to
        about 1% of the largest Q-value for random weights and inputs.

    Returns:
      A built ``keras.Sequential`` mapping uint8
      ``(N, *obs_shape)`` to float32 ``(N, num_actions)``.
    """
    _check_num_actions(num_actions)
    _check_dtype_policy(dtype_policy)
    conv = _strided_conv_layer(space_to_depth)
    policy = dict(dtype=dtype_policy)
    return keras.Sequential(
        [
            *_pixel_stem(obs_shape, scale_obs=True, dtype_policy=dtype_policy),
            conv(32, 8, strides=4, activation="relu", name="conv1", **policy),
            conv(64, 4, strides=2, activation="relu", name="conv2", **policy),
            keras.layers.Conv2D(64, 3, strides=1, activation="relu", name="conv3", **policy),
            keras.layers.Flatten(name="flatten", **policy),
            keras.layers.Dense(512, activation="relu", name="fc", **policy),
            _q_values_layer(num_actions),
        ],
        name="nature_cnn",
    )


def notebook_cnn(
    num_actions: int,
    obs_shape: Sequence[int] = ATARI_OBS_SHAPE,
    scale_obs: bool = True,
    space_to_depth: bool | None = None,
    dtype_policy: str = "float32",
) -> keras.Model:
    """The network of the TF notebook fdqn started from, layer for layer.

    Conv 16 5x5 stride 2, conv 32 5x5 stride 2, conv 32 5x5 stride 2, flatten,
    dense ``num_actions``, all with 'valid' padding and, as in the notebook, no
    activations at all: the whole network is affine in its input. Kept for
    faithful comparison; prefer :func:`nature_cnn` for learning.

    Args:
      num_actions: size of the discrete action space.
      obs_shape: shape of one observation, ``(stack, height, width)``, uint8.
      scale_obs: scale pixels to [0, 1]. The notebook feeds raw 0-255 values
        (``scale_obs=False``); scaling is the default here.
      space_to_depth: make the three convolutions :class:`SpaceToDepthConv2D`
        (same weights, outputs and gradients, a faster input gradient; the
        first also computes its forward pass in the space-to-depth form, which
        XLA:CPU runs faster for its 4 input channels and 5x5 kernel);
        ``None`` does so when JAX runs on the CPU.
      dtype_policy: one of :data:`DTYPE_POLICIES`, as in :func:`nature_cnn`.

    Returns:
      A ``keras.Sequential``; after the transpose to channels-last its
      convolution and dense kernels have the same shapes and flatten order as
      the notebook's ``tf.keras`` model, so weights carry over unchanged.
    """
    _check_num_actions(num_actions)
    _check_dtype_policy(dtype_policy)
    conv = _strided_conv_layer(space_to_depth)
    policy = dict(dtype=dtype_policy)
    return keras.Sequential(
        [
            *_pixel_stem(obs_shape, scale_obs=scale_obs, dtype_policy=dtype_policy),
            conv(16, 5, strides=2, forward="space_to_depth", name="conv1", **policy),
            conv(32, 5, strides=2, name="conv2", **policy),
            conv(32, 5, strides=2, name="conv3", **policy),
            keras.layers.Flatten(name="flatten", **policy),
            _q_values_layer(num_actions),
        ],
        name="notebook_cnn",
    )


def mlp(
    num_actions: int,
    obs_dim: int,
    hidden: Sequence[int] = (64, 64),
    dtype_policy: str = "float32",
) -> keras.Model:
    """A ReLU multi-layer perceptron for vector observations (CartPole and friends).

    Args:
      num_actions: size of the discrete action space.
      obs_dim: length of one observation vector.
      hidden: widths of the hidden layers.
      dtype_policy: one of :data:`DTYPE_POLICIES`, as in :func:`nature_cnn`.

    Returns:
      A ``keras.Sequential`` mapping float ``(N, obs_dim)`` to float32 ``(N, num_actions)``.
    """
    _check_num_actions(num_actions)
    _check_dtype_policy(dtype_policy)
    if not isinstance(obs_dim, (int, np.integer)) or obs_dim < 1:
        raise ValueError(f"obs_dim must be a positive integer, got {obs_dim!r}")
    if any((not isinstance(h, (int, np.integer))) or h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be positive integers, got {tuple(hidden)}")
    layers: list[Any] = [keras.Input(shape=(int(obs_dim),), dtype="float32", name="obs")]
    for i, width in enumerate(hidden):
        layers.append(
            keras.layers.Dense(int(width), activation="relu", name=f"fc{i + 1}", dtype=dtype_policy)
        )
    layers.append(_q_values_layer(num_actions))
    return keras.Sequential(layers, name="mlp")


def pure_q_fn(model: keras.Model) -> tuple[QFn, Params]:
    """Turns a built Keras model into a pure function and its parameters.

    The returned ``q_fn(params, obs)`` calls ``model.stateless_call`` in
    inference mode; it holds no ``keras.Variable`` and can be jitted, vmapped
    and differentiated. ``params`` is a list of arrays, one per trainable
    variable. Non-trainable variables (BatchNorm statistics, say) are frozen at
    their values at conversion time. The arrays are copies: later use of the
    model (``fit``, ``predict``) cannot invalidate them. Observations whose
    shape the model's ``keras.Input`` does not take raise a one-line
    ``ValueError`` (checked when traced, so it costs nothing per call).

    Args:
      model: a built ``keras.Model`` (give it an ``Input`` or call it once).

    Returns:
      ``(q_fn, params)``.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(
            f"model {model.name!r} is not built: give it a keras.Input or call it on a batch first"
        )
    # Copies, not the variables' own buffers: Keras' fit/predict donate those to
    # their compiled steps, which would delete arrays still held here.
    frozen = [jnp.array(v.value, copy=True) for v in model.non_trainable_variables]
    input_shape = _input_shape(model)

    def q_fn(params: Params, obs: jax.Array) -> jax.Array:
        if input_shape is not None:
            _check_obs_shape(model.name, input_shape, jnp.shape(obs))
        q_values, _ = model.stateless_call(params, frozen, obs, training=False)
        return q_values

    return q_fn, [jnp.array(v.value, copy=True) for v in model.trainable_variables]


def _input_shape(model: keras.Model) -> tuple[int | None, ...] | None:
    """The shape of the model's one input, batch axis first; ``None`` if it has no single input."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # subclassed models built by a call have none
        return None
    if not inputs or len(inputs) != 1:
        return None
    return tuple(inputs[0].shape)


def _check_obs_shape(name: str, expected: tuple[int | None, ...], got: tuple[int, ...]) -> None:
    """A one-line ValueError when observations do not have the shape the model takes.

    Runs when a jitted function is traced (shapes are static), not on every call.
    """
    fits = len(got) == len(expected) and all(
        want is None or want == have for want, have in zip(expected[1:], got[1:])
    )
    if not fits:
        dims = ", ".join("?" if d is None else str(d) for d in expected[1:])
        raise ValueError(
            f"observations have shape {tuple(got)}; model {name!r} takes (batch, {dims})"
        )


def write_params(model: keras.Model, params: Params) -> keras.Model:
    """Assigns ``params`` to the model's trainable variables, in place.

    Args:
      model: the model ``params`` came from (via :func:`pure_q_fn`).
      params: a list of arrays matching ``model.trainable_variables``.

    Returns:
      The same model, for chaining (``write_params(m, p).save_weights(...)``).
    """
    variables = model.trainable_variables
    if len(params) != len(variables):
        raise ValueError(
            f"model {model.name!r} has {len(variables)} trainable variables, "
            f"params has {len(params)} arrays"
        )
    for var, value in zip(variables, params):
        if tuple(var.shape) != tuple(np.shape(value)):
            raise ValueError(
                f"variable {var.path} has shape {tuple(var.shape)}, "
                f"params gives {tuple(np.shape(value))}"
            )
    for var, value in zip(variables, params):
        var.assign(jnp.array(value, copy=True))  # never share a buffer Keras may donate
    return model
