"""Every CPU-specific workaround of fdqn, applied only when asked for.

Importing fdqn changes nothing in the process. On a CPU-only machine two
kinds of tuning pay (``benchmarks/README.md`` has the side-by-side figures):

- process settings, :func:`tune`: an XLA:CPU flag and glibc malloc options.
  They are process-wide, so they are the caller's explicit choice, made once
  before JAX computes anything. ``python -m fdqn.train`` makes it by default
  when JAX has no accelerator plugin installed (``--no-cpu-tuning`` turns it
  off) and says so in its first line.
- layers, :func:`cpu_model`: a copy of a Keras model whose convolutions and
  dense layers are :class:`CpuConv2D` and :class:`CpuDense` layers. Same
  variables, outputs and gradients (up to float32 rounding), computed in
  forms XLA:CPU runs faster, and in loop bodies many times faster. The
  networks fdqn builds are stock Keras layers; the rewrite is applied to a
  copy and parameters carry over both ways unchanged, so saved models stay
  portable.
"""

import ctypes
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import keras

# -- process settings -----------------------------------------------------------

# The XLA:CPU flag: YNNPACK fusions for single matrix products only. By default
# jaxlib 0.10 hands convolutions and matrix products to YNNPACK, which runs the
# convolutions of the Nature and notebook networks slower than XLA's own
# (Eigen) kernels; without YNNPACK at all, products with a transposed operand
# (a dense layer's input gradient) are slow. tests/test_cpu.py checks that
# Q-values, losses and gradients stay within float32 tolerance of XLA's
# default path.
XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
# jaxlib releases the flag was measured and tested with. XLA aborts the process
# on a flag it does not know, and YNNPACK fusions have had miscompilations in
# other releases, so other versions keep XLA's defaults.
TESTED_JAXLIB = ("0.10.",)
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")

# glibc malloc options. XLA:CPU takes the scratch memory of each jitted call
# from malloc and frees it when the call ends. glibc serves blocks above its
# mmap threshold (at most 32 MB) with a fresh mmap and unmaps them on free, so
# a call with more scratch than that faults every page of it in again, each
# time. With large blocks taken from the heap instead (no mmap) and freed
# memory kept for reuse (trim threshold, top pad), the scratch stays mapped
# from call to call. The price is the whole process's: freed memory stays
# mapped, and a large zero-filled array (calloc, np.zeros) comes from the
# heap, where glibc sometimes clears it page by page at allocation instead of
# leaving pages unmapped until first written.
MALLOC_SETTINGS = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 256 << 20, "M_TOP_PAD": 64 << 20}
# The same settings as glibc's environment variables, read when a process
# starts: for child processes (the baselines of benchmarks/compare.py).
MALLOC_SETTINGS_ENV = {f"MALLOC_{k[2:]}_": str(v) for k, v in MALLOC_SETTINGS.items()}
# mallopt's parameter numbers, from glibc's malloc.h
_MALLOPT_PARAM = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_MAX": -4}
# environment variables through which glibc takes a user's own malloc tuning
_MALLOC_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What :func:`tune` applied.

    Attributes:
      xla_flags: the flags put in ``XLA_FLAGS``, or None.
      malloc: the malloc options set, ``{name: value}``, or None.
      skipped: one reason per setting left alone.
    """

    xla_flags: str | None
    malloc: dict[str, int] | None
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for a log: what was applied and what was left alone."""
        parts = []
        if self.xla_flags:
            parts.append(f"XLA_FLAGS={self.xla_flags}")
        if self.malloc:
            parts.append("malloc " + ", ".join(f"{k}={v}" for k, v in self.malloc.items()))
        return "; ".join(parts + [f"not {s}" for s in self.skipped]) or "nothing"


def accelerator_installed() -> bool:
    """Whether a GPU or TPU plugin of JAX is installed (found without starting JAX)."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def _backends_started() -> bool:
    """Whether JAX has created its backends, after which XLA reads no more flags.

    JAX has no public query for this; its internal one is used where it exists,
    and an unknown state counts as started (no flag is set then).
    """
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # no public API tells this without starting JAX

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def tune(xla_flags: bool = True, malloc: bool = True) -> Tuning:
    """Applies fdqn's CPU process settings where they are safe; returns what it did.

    Call it once, before JAX computes anything. Each setting is applied only
    where the user has not chosen their own:

    - ``XLA_FLAGS`` gets :data:`XLA_FLAGS` unless ``XLA_FLAGS`` is already
      set (even to ``""``), an accelerator plugin is installed, jaxlib is not
      a tested release, or JAX's backends have started.
    - glibc's ``mallopt`` gets :data:`MALLOC_SETTINGS` unless a ``MALLOC_*_``
      variable or a ``glibc.malloc`` tunable is set, an accelerator plugin is
      installed (scratch memory then lives on the device), or the C library
      is not glibc.

    Args:
      xla_flags: set the XLA:CPU flag.
      malloc: set the malloc options.
    """
    skipped = []
    flags = _tune_xla(skipped) if xla_flags else None
    options = _tune_malloc(skipped) if malloc else None
    return Tuning(flags, options, tuple(skipped))


def _tune_xla(skipped: list[str]) -> str | None:
    if "XLA_FLAGS" in os.environ:
        skipped.append("XLA flags (XLA_FLAGS is set)")
        return None
    if accelerator_installed():
        skipped.append("XLA flags (an accelerator plugin is installed)")
        return None
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    if not version.startswith(TESTED_JAXLIB):
        skipped.append(f"XLA flags (jaxlib {version or '?'} is not a tested release)")
        return None
    if _backends_started():
        skipped.append("XLA flags (JAX had started)")
        return None
    os.environ["XLA_FLAGS"] = XLA_FLAGS
    return XLA_FLAGS


def _tune_malloc(skipped: list[str]) -> dict[str, int] | None:
    if not sys.platform.startswith("linux"):
        skipped.append("malloc (not Linux)")
        return None
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        skipped.append("malloc (the environment tunes it)")
        return None
    if accelerator_installed():
        skipped.append("malloc (an accelerator plugin is installed)")
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        skipped.append("malloc (not glibc)")
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return {
        name: value
        for name, value in MALLOC_SETTINGS.items()
        if mallopt(_MALLOPT_PARAM[name], value) == 1
    }


# -- layers ----------------------------------------------------------------------

# XLA:CPU hands a convolution to its Eigen kernels only in one form: NHWC input,
# HWIO kernel, NHWC output (b01f_01io->b01f in HLO). Its convolution-
# canonicalization pass rewrites other forms into that one with transposes, but
# only in the entry computation: inside a loop body (a lax.scan or fori_loop,
# where the compiled run takes its updates) the gradient convolutions JAX
# derives, which have their batch and feature axes swapped (f01b_i01o->01bf)
# or a reversed kernel with its channels swapped (b01f_01oi->b01f), go to the
# elementwise loop emitter instead: the Nature CNN's update runs many times
# slower there (benchmarks/update_in_loop.py). Every convolution below, the
# gradients included, is written in the Eigen form, with explicit transposes.
_NHWC = ("NHWC", "HWIO", "NHWC")


def _direct_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=_NHWC)


def _kernel_blocks(kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """The kernel of the space-to-depth form: zero-padded to whole ``sh x sw`` blocks, stacked."""
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    bh, bw = -(-kh // sh), -(-kw // sw)  # kernel size in blocks
    cin, cout = kernel.shape[2], kernel.shape[3]
    kernel = jnp.pad(kernel, ((0, bh * sh - kh), (0, bw * sw - kw), (0, 0), (0, 0)))
    kernel = kernel.reshape(bh, sh, bw, sw, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    return kernel.reshape(bh, bw, sh * sw * cin, cout)


def _input_blocks(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """The input of the space-to-depth form: cut into ``sh x sw`` blocks stacked along channels."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    bh, bw = -(-kh // sh), -(-kw // sw)
    n, h, w, c = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    # rows and columns the zero-padded kernel reaches: a whole number of blocks
    nh, nw = (oh - 1) * sh + bh * sh, (ow - 1) * sw + bw * sw
    x = x[:, : min(h, nh), : min(w, nw)]
    if nh > h or nw > w:  # only zero taps reach these
        x = jnp.pad(x, ((0, 0), (0, max(0, nh - h)), (0, max(0, nw - w)), (0, 0)))
    x = x.reshape(n, nh // sh, sh, nw // sw, sw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, nh // sh, nw // sw, sh * sw * c)


def _space_to_depth_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """The same convolution as ``_direct_conv``, as space-to-depth + a stride-1 convolution.

    Kernel and input are cut into ``sh x sw`` blocks and the blocks stacked
    along channels; a stride-1 convolution with a ``ceil(k / s)``-sized
    kernel does the rest.
    """
    blocks = _input_blocks(x, kernel.shape[:2], strides)
    return _direct_conv(blocks, _kernel_blocks(kernel, strides), (1, 1))


def _kernel_gradient(
    x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int]
) -> jax.Array:
    """d kernel of ``sum(g * _direct_conv(x, kernel, strides))``, one Eigen-form convolution.

    ``dk[a, b, c, f] = sum over n, i, j of x[n, s*i + a, s*j + b, c] * g[n, i, j, f]``:
    a convolution of the input, with channels as its batch and examples as its
    features, by ``g`` dilated by the strides.
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    oh, ow = g.shape[1:3]
    x = x[:, : (oh - 1) * sh + kh, : (ow - 1) * sw + kw]  # rows no output reaches
    dk = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0),  # (C, H, W, N)
        g.transpose(1, 2, 0, 3),  # (oh, ow, N, F)
        (1, 1),
        "VALID",
        rhs_dilation=strides,
        dimension_numbers=_NHWC,
    )  # (C, kh, kw, F)
    return dk.transpose(1, 2, 0, 3)


def _stride1_input_gradient(g: jax.Array, kernel: jax.Array) -> jax.Array:
    """d x of ``sum(g * _direct_conv(x, kernel, (1, 1)))``, one Eigen-form convolution.

    The full convolution of ``g`` with the kernel flipped in space and its
    input and output channels swapped.
    """
    kh, kw = kernel.shape[:2]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, F, C)
    pad = ((kh - 1, kh - 1), (kw - 1, kw - 1))
    return jax.lax.conv_general_dilated(g, flipped, (1, 1), pad, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], forward: str = "direct"
) -> jax.Array:
    """A 'valid' convolution (NHWC input, HWIO kernel) whose gradients XLA:CPU runs fast.

    Values, and both gradients, are those of ``jax.lax.conv_general_dilated``
    up to float32 rounding. Every convolution of the forward and backward
    passes is in the one form XLA:CPU gives its Eigen kernels, in loop bodies
    too (see the comment above). The input gradient of a strided convolution
    is taken through its space-to-depth form, where it is a stride-1
    convolution; XLA otherwise emits a convolution over a dilated input for
    it, which XLA:CPU runs slower.

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


def _conv2d_fwd(x, kernel, strides, forward):
    return _forward_fn(forward)(x, kernel, strides), (x, kernel)


def _conv2d_bwd(strides, forward, residuals, g):
    x, kernel = residuals
    d_kernel = _kernel_gradient(x, g, kernel.shape[:2], strides)
    if tuple(strides) == (1, 1):
        return _stride1_input_gradient(g, kernel), d_kernel
    # the input blocks are a linear rearrangement of x: their vjp scatters back
    _, scatter = jax.vjp(lambda v: _input_blocks(v, kernel.shape[:2], strides), x)
    d_blocks = _stride1_input_gradient(g, _kernel_blocks(kernel, strides))
    (d_x,) = scatter(d_blocks)
    return d_x, d_kernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def bias_add(x: jax.Array, bias: jax.Array) -> jax.Array:
    """``x + bias`` over the last axis, with the bias gradient as a matrix-vector product.

    The gradient with respect to ``bias`` sums the cotangent over every axis
    but the last. XLA:CPU runs that reduction as an elementwise loop, slower
    than the same sum as a product with a vector of ones, which is how it is
    computed here. Values and gradients are those of ``x + bias`` up to
    float32 rounding.
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
class CpuConv2D(keras.layers.Conv2D):
    """A ``Conv2D`` computed by :func:`conv2d`, its bias added by :func:`bias_add`.

    Same weights, outputs and gradients (up to float32 rounding) as
    ``keras.layers.Conv2D``, in the forms XLA:CPU runs fast, in loop bodies
    too. Applies to ``padding="valid"``, ``channels_last``, no dilation, no
    groups, on the JAX backend; other settings fall back to ``Conv2D``.

    Args:
      *args, **kwargs: those of ``keras.layers.Conv2D``.
      forward: how the forward pass is computed, as in :func:`conv2d`.
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
        )

    def call(self, inputs):
        if not (self.use_bias and self._rewrite_applies()):
            return super().call(inputs)
        outputs = self.convolution_op(inputs, self.kernel)
        outputs = bias_add(outputs, keras.ops.convert_to_tensor(self.bias))
        return outputs if self.activation is None else self.activation(outputs)

    def convolution_op(self, inputs, kernel):
        if not self._rewrite_applies():
            return super().convolution_op(inputs, kernel)
        kernel = keras.ops.convert_to_tensor(kernel)  # a keras.Variable when called eagerly
        return conv2d(inputs, kernel, tuple(int(s) for s in self.strides), self.forward)


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` for a ``(N, I)`` input and an ``(I, O)`` kernel, gradients as products.

    The kernel gradient is the product of ``x`` and the cotangent contracted
    over the batch, in the kernel's own ``(I, O)`` shape. XLA otherwise
    derives it as its transpose, ``(O, I)``, in the Nature CNN's update inside
    a loop, and every Adam step then reads it transposed. Values and
    gradients are those of ``x @ kernel`` up to float32 rounding.
    """
    return x @ kernel


def _matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    d_x = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())))
    d_kernel = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))
    return d_x, d_kernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@keras.saving.register_keras_serializable(package="fdqn")
class CpuDense(keras.layers.Dense):
    """A ``Dense`` layer computed by :func:`matmul`, its bias added by :func:`bias_add`.

    Same weights, outputs and gradients (up to float32 rounding) as
    ``keras.layers.Dense``. Applies to 2-D inputs on the JAX backend without
    LoRA or quantization; others fall back to ``Dense``.
    """

    def call(self, inputs, training=None):
        if not (
            keras.backend.backend() == "jax"
            and len(inputs.shape) == 2
            and not self.lora_enabled
            and not self.quantization_mode
        ):
            return super().call(inputs, training=training)
        outputs = matmul(inputs, keras.ops.convert_to_tensor(self.kernel))
        if self.bias is not None:
            outputs = bias_add(outputs, keras.ops.convert_to_tensor(self.bias))
        return outputs if self.activation is None else self.activation(outputs)


def _forward_for(layer: keras.layers.Conv2D) -> str:
    """The forward form that is faster on XLA:CPU for this layer's shape.

    The space-to-depth forward pass pays for a first layer with few input
    channels whose kernel is not a whole number of strides (the notebook
    network's 5x5 stride 2 on 4 frames), and costs elsewhere (the Nature
    CNN's 8x8 stride 4): ``benchmarks/space_to_depth.py``.
    """
    channels = layer.input.shape[-1] if hasattr(layer, "input") else None
    uneven = any(k % s for k, s in zip(layer.kernel_size, layer.strides))
    return "space_to_depth" if channels is not None and channels <= 4 and uneven else "direct"


def cpu_model(model: keras.Model) -> keras.Model:
    """A copy of ``model`` whose ``Conv2D`` and ``Dense`` layers are :class:`CpuConv2D`
    and :class:`CpuDense`.

    The copy has the same variables, in the same order and with the same
    values, so parameters from :func:`fdqn.pure_q_fn` of either model fit the
    other. Layers the rewrite does not apply to are shared with ``model``; a
    model without convolutions (an MLP) is returned as it is. Save the original
    (stock) model, not the copy, to keep model files portable.
    """

    def convolution(layer) -> bool:
        return type(layer) is keras.layers.Conv2D

    def rewritten(layer) -> bool:
        return convolution(layer) or type(layer) is keras.layers.Dense

    def clone(layer):
        if not rewritten(layer):  # shared: weights are set below, and pure_q_fn copies them
            return layer
        if not convolution(layer):
            return CpuDense(
                layer.units,
                activation=layer.activation,
                use_bias=layer.use_bias,
                dtype=layer.dtype_policy,
                name=layer.name,
            )
        # from the layer's attributes, not get_config: Keras' serialization imports
        # TensorFlow where it is installed (seconds and hundreds of MB)
        return CpuConv2D(
            layer.filters,
            layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            data_format=layer.data_format,
            dilation_rate=layer.dilation_rate,
            groups=layer.groups,
            activation=layer.activation,
            use_bias=layer.use_bias,
            dtype=layer.dtype_policy,
            name=layer.name,
            forward=_forward_for(layer),
        )

    if not any(convolution(layer) for layer in model.layers):
        return model
    if isinstance(model, keras.Sequential) and len(model.inputs) == 1:
        # rebuilt layer by layer: keras.models.clone_model serializes every layer
        spec = model.inputs[0]
        inputs = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name=spec.name)
        copy = keras.Sequential([inputs, *map(clone, model.layers)], name=model.name)
    else:
        copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy
