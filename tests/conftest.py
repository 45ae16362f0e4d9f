"""Test configuration: Triton runs on the CPU through its interpreter; GPU tests skip without a GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, hence at the top here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from diffrl.ops import _alloc, _dispatch  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Kernel outputs start as NaN: an element a kernel forgets to write fails the comparison."""
    _alloc.POISON = True
    yield
    _alloc.POISON = False


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # a different seed per test (reproducible from the test id), never zeros or fixed data
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def available(backend: str, device: str = "cpu") -> bool:
    ok, _ = _dispatch.backend_status(backend)
    return ok and _dispatch._runs_on(backend, torch.device(device))
