"""Q-networks as Keras 3 models, and their conversion to pure JAX functions.

Pixel networks take the observations the Atari environments give, uint8 of
shape ``(N, stack, 84, 84)`` (channels first), and do the scaling and layout
change inside the model, so callers never preprocess by hand. Vector networks
take float observations of shape ``(N, obs_dim)``.

The networks are stock Keras layers on every backend and device, so their
weights and ``.keras`` files load anywhere Keras runs. The CPU-only rewrite
of their strided convolutions is :mod:`fdqn.cpu`'s.

Any ``keras.Model`` mapping observations to ``(N, num_actions)`` Q-values can
be used in place of these: :func:`pure_q_fn` turns it into
``q_fn(params, obs) -> q_values`` over plain arrays, and :func:`write_params`
copies trained parameters back into the model (to call ``model.predict`` or
``model.save_weights``).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from fdqn import rundir

Params = list  # the model's trainable arrays, in ``model.trainable_variables`` order
QFn = Callable[[Params, jax.Array], jax.Array]

ATARI_OBS_SHAPE = (4, 84, 84)
# Keras dtype policies the networks take: float32 throughout, or bfloat16 compute
# with float32 variables ("mixed_bfloat16"), the Q-value layer staying float32.
DTYPE_POLICIES = ("float32", "mixed_bfloat16")


def _initializer_seeds(seed: int | None, count: int) -> list[int | None]:
    """``count`` distinct initializer seeds drawn from ``seed`` (all None when it is None)."""
    if seed is None:
        return [None] * count
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return [int(x) for x in np.random.SeedSequence(int(seed)).generate_state(count) >> 1]


def _seeded(seeds: list[int | None]) -> Callable[[], dict[str, Any]]:
    """Initializer arguments for the next layer: a seeded Glorot-uniform kernel, or Keras' own."""
    iterator = iter(seeds)

    def kernel() -> dict[str, Any]:
        value = next(iterator)
        if value is None:
            return {}
        return {"kernel_initializer": keras.initializers.GlorotUniform(seed=value)}

    return kernel


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


def _q_values_layer(num_actions: int, init: dict[str, Any]) -> keras.layers.Dense:
    """The output layer: float32 under every policy, so Q-values and the TD loss are float32."""
    return keras.layers.Dense(num_actions, name="q_values", dtype="float32", **init)


def _check_num_actions(num_actions: int) -> None:
    if not isinstance(num_actions, (int, np.integer)) or num_actions < 1:
        raise ValueError(f"num_actions must be a positive integer, got {num_actions!r}")


def nature_cnn(
    num_actions: int,
    obs_shape: Sequence[int] = ATARI_OBS_SHAPE,
    dtype_policy: str = "float32",
    seed: int | None = None,
) -> keras.Model:
    """The DQN network of Mnih et al. (2015, Nature), with ReLU activations.

    Conv 32 8x8 stride 4, conv 64 4x4 stride 2, conv 64 3x3 stride 1, dense 512,
    dense ``num_actions``. Pixels are scaled to [0, 1] inside the model.

    Args:
      num_actions: size of the discrete action space.
      obs_shape: shape of one observation, ``(stack, height, width)``, uint8.
      dtype_policy: one of :data:`DTYPE_POLICIES`. ``"mixed_bfloat16"`` keeps
        the variables (and so the parameters, gradients and optimizer state)
        float32 and computes every layer but the last in bfloat16, for
        accelerators with bfloat16 matrix units; the Q-value layer computes in
        float32. Q-values differ from float32 ones by bfloat16 rounding: up to
        about 1% of the largest Q-value for random weights and inputs.
      seed: makes the initial weights a function of it (Glorot-uniform kernels,
        zero biases, as Keras' defaults); ``None`` leaves them to Keras' global
        seed (``keras.utils.set_random_seed``).

    Returns:
      A built ``keras.Sequential`` mapping uint8
      ``(N, *obs_shape)`` to float32 ``(N, num_actions)``.
    """
    _check_num_actions(num_actions)
    _check_dtype_policy(dtype_policy)
    init = _seeded(_initializer_seeds(seed, 5))
    policy = dict(dtype=dtype_policy)
    conv = keras.layers.Conv2D
    return keras.Sequential(
        [
            *_pixel_stem(obs_shape, scale_obs=True, dtype_policy=dtype_policy),
            conv(32, 8, strides=4, activation="relu", name="conv1", **policy, **init()),
            conv(64, 4, strides=2, activation="relu", name="conv2", **policy, **init()),
            conv(64, 3, strides=1, activation="relu", name="conv3", **policy, **init()),
            keras.layers.Flatten(name="flatten", **policy),
            keras.layers.Dense(512, activation="relu", name="fc", **policy, **init()),
            _q_values_layer(num_actions, init()),
        ],
        name="nature_cnn",
    )


def notebook_cnn(
    num_actions: int,
    obs_shape: Sequence[int] = ATARI_OBS_SHAPE,
    scale_obs: bool = True,
    dtype_policy: str = "float32",
    seed: int | None = None,
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
      dtype_policy: one of :data:`DTYPE_POLICIES`, as in :func:`nature_cnn`.
      seed: the initial weights' seed, as in :func:`nature_cnn`.

    Returns:
      A ``keras.Sequential``; after the transpose to channels-last its
      convolution and dense kernels have the same shapes and flatten order as
      the notebook's ``tf.keras`` model, so weights carry over unchanged.
    """
    _check_num_actions(num_actions)
    _check_dtype_policy(dtype_policy)
    init = _seeded(_initializer_seeds(seed, 4))
    policy = dict(dtype=dtype_policy)
    conv = keras.layers.Conv2D
    return keras.Sequential(
        [
            *_pixel_stem(obs_shape, scale_obs=scale_obs, dtype_policy=dtype_policy),
            conv(16, 5, strides=2, name="conv1", **policy, **init()),
            conv(32, 5, strides=2, name="conv2", **policy, **init()),
            conv(32, 5, strides=2, name="conv3", **policy, **init()),
            keras.layers.Flatten(name="flatten", **policy),
            _q_values_layer(num_actions, init()),
        ],
        name="notebook_cnn",
    )


def mlp(
    num_actions: int,
    obs_dim: int,
    hidden: Sequence[int] = (64, 64),
    dtype_policy: str = "float32",
    seed: int | None = None,
) -> keras.Model:
    """A ReLU multi-layer perceptron for vector observations (CartPole and friends).

    Args:
      num_actions: size of the discrete action space.
      obs_dim: length of one observation vector.
      hidden: widths of the hidden layers.
      dtype_policy: one of :data:`DTYPE_POLICIES`, as in :func:`nature_cnn`.
      seed: the initial weights' seed, as in :func:`nature_cnn`.

    Returns:
      A ``keras.Sequential`` mapping float ``(N, obs_dim)`` to float32 ``(N, num_actions)``.
    """
    _check_num_actions(num_actions)
    _check_dtype_policy(dtype_policy)
    if not isinstance(obs_dim, (int, np.integer)) or obs_dim < 1:
        raise ValueError(f"obs_dim must be a positive integer, got {obs_dim!r}")
    if any((not isinstance(h, (int, np.integer))) or h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be positive integers, got {tuple(hidden)}")
    init = _seeded(_initializer_seeds(seed, len(hidden) + 1))
    layers: list[Any] = [keras.Input(shape=(int(obs_dim),), dtype="float32", name="obs")]
    for i, width in enumerate(hidden):
        layers.append(
            keras.layers.Dense(
                int(width), activation="relu", name=f"fc{i + 1}", dtype=dtype_policy, **init()
            )
        )
    layers.append(_q_values_layer(num_actions, init()))
    return keras.Sequential(layers, name="mlp")


def minatar_cnn(
    num_actions: int,
    obs_shape: Sequence[int],
    dtype_policy: str = "float32",
    seed: int | None = None,
) -> keras.Model:
    """The DQN network of the MinAtar benchmark (Young and Tian, 2019).

    Conv 16 3x3 stride 1 ('valid'), dense 128, dense ``num_actions``, ReLU
    activations, on MinAtar's ``(10, 10, channels)`` 0/1 observations
    (channels last, as gymnax gives them; uint8 or float).

    Args:
      num_actions: size of the discrete action space.
      obs_shape: shape of one observation, ``(height, width, channels)``.
      dtype_policy, seed: as in :func:`nature_cnn`.

    Returns:
      A built ``keras.Sequential`` mapping ``(N, *obs_shape)`` to float32
      ``(N, num_actions)``.
    """
    _check_num_actions(num_actions)
    _check_dtype_policy(dtype_policy)
    obs_shape = tuple(int(d) for d in obs_shape)
    if len(obs_shape) != 3 or min(obs_shape) < 3:
        raise ValueError(
            f"obs_shape must be (height, width, channels) of 3 or more, got {obs_shape}"
        )
    init = _seeded(_initializer_seeds(seed, 3))
    policy = dict(dtype=dtype_policy)
    return keras.Sequential(
        [
            keras.Input(shape=obs_shape, dtype="float32", name="obs"),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv", **policy, **init()),
            keras.layers.Flatten(name="flatten", **policy),
            keras.layers.Dense(128, activation="relu", name="fc", **policy, **init()),
            _q_values_layer(num_actions, init()),
        ],
        name="minatar_cnn",
    )


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


def save_model(model: keras.Model, params: Params, path: str) -> str:
    """Writes ``model`` with ``params`` as a Keras model file, atomically; returns ``path``.

    The file (``.keras``) is Keras' own format: ``keras.saving.load_model(path)``
    opens it in a process that never imports fdqn, on any Keras backend, when
    the model is made of stock Keras layers (as fdqn's networks are). It is
    written under a temporary name beside ``path`` and renamed into place, so
    an existing file is replaced whole or not at all.
    """
    if not path.endswith(".keras"):
        raise ValueError(f"a Keras model file's name ends in .keras, got {path!r}")
    write_params(model, params)
    rundir.atomic_write_path(path, model.save)
    return path
