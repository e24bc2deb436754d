"""Tests that use PyTorch as ground truth: the ones marked `torch`, and the
docstring examples that import it.

PyTorch is not in the test extra (on a fresh machine pip resolves it to a
CUDA build of several GB). Where it is not installed, each such test is
still collected and reported as skipped, naming what it needs; CI runs them
in the lanes that install its CPU build (.ci/run).
"""

import importlib.util
import re

import pytest

_NEEDS_TORCH = pytest.mark.skip(
    reason="needs PyTorch (the ground truth of the checkpoint tests): "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu"
)


def _imports_torch(item: pytest.Item) -> bool:
    test = getattr(item, "dtest", None)  # a docstring example
    return test is not None and any(
        re.search(r"\bimport\b.*\btorch\b", example.source)
        for example in test.examples
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    installed = importlib.util.find_spec("torch") is not None
    for item in items:
        if _imports_torch(item):
            item.add_marker(pytest.mark.torch)
        if not installed and item.get_closest_marker("torch"):
            item.add_marker(_NEEDS_TORCH)
