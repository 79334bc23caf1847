"""The README's Python example runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["metrics"]["loss"]))
    np.testing.assert_allclose(namespace["td"], 1.7, rtol=1e-6)
