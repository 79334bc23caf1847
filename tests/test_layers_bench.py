"""The per-layer benchmark times the same arithmetic in every implementation.

benchmarks/layers.py compares fdqn's convolution and dense kernels with TF's
and PyTorch's one pass at a time; that comparison means something only if
each pass computes the same array everywhere. Each is checked here against
the float64 NumPy value of the same pass. TF comes with the ``tf`` extra (CI
installs it). PyTorch is not part of the tests (its baseline runs on demand,
with the ``torch`` extra, in ``python benchmarks/layers.py``).
"""

import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "layers.py")
_spec = importlib.util.spec_from_file_location("fdqn_bench_layers", _PATH)
layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layers)


def reference(op: str) -> np.ndarray:
    """The pass in float64 NumPy, channels last (HWIO kernels), by its definition."""
    layer, which = op.split(":")
    x, w, g = (a.astype(np.float64) for a in layers._arrays(layer, channels_last=True))
    _, _, _, _, k, stride = layers.LAYERS[layer]
    if k == 0:
        return {"forward": x @ w, "kernel_grad": x.T @ g, "input_grad": g @ w.T}[which]
    out = g.shape[1]
    # taps[i, j]: the input pixels kernel tap (i, j) meets, (N, out, out, C)
    taps = [
        [
            x[:, i : i + stride * (out - 1) + 1 : stride, j : j + stride * (out - 1) + 1 : stride]
            for j in range(k)
        ]
        for i in range(k)
    ]
    if which == "forward":
        return sum(taps[i][j] @ w[i, j] for i in range(k) for j in range(k))
    if which == "kernel_grad":
        return np.array(
            [[np.einsum("nhwc,nhwf->cf", taps[i][j], g) for j in range(k)] for i in range(k)]
        )
    dx = np.zeros_like(x)
    for i in range(k):
        for j in range(k):
            dx[
                :, i : i + stride * (out - 1) + 1 : stride, j : j + stride * (out - 1) + 1 : stride
            ] += g @ w[i, j].T
    return dx


def check(impl, op: str) -> None:
    value = np.asarray(impl.build(op)(), np.float64)
    want = reference(op)
    assert value.shape == want.shape, op
    # float32 sums of up to 100k products: errors relative to the largest entry
    np.testing.assert_allclose(value / np.abs(want).max(), want / np.abs(want).max(), atol=2e-5)


def test_ops_cover_every_layer_and_skip_first_layer_input_gradients():
    ops = layers.ops()
    assert len(ops) == len(layers.LAYERS) * 3 - len(layers.FIRST_LAYERS)
    assert "notebook/conv1:input_grad" not in ops and "notebook/conv2:input_grad" in ops


@pytest.mark.parametrize("op", layers.ops())
def test_fdqn_passes_compute_their_definition(op):
    check(layers.FdqnLayers(), op)


@pytest.mark.parametrize("op", layers.ops())
def test_tf_passes_compute_their_definition(op):
    pytest.importorskip("tf_keras")
    pytest.importorskip("tensorflow")
    check(layers.TfLayers(), op)  # layers.py put benchmarks/ on sys.path for tf_notebook
