import os

import pytest
import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every compile in the tests checks the graph invariants after every pass (docs/invariants.md).
os.environ.setdefault("MEMSAVE_DEBUG", "1")
# Under pytest-xdist (the README's `-n 2`) two workers share the machine's cores: one thread
# each, or their OpenMP threads oversubscribe the cores and both run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits from earlier tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    """Where generated Triton kernel files go during the tests."""
    return tmp_path_factory.mktemp("triton_cache")


@pytest.fixture
def triton_env(request, monkeypatch, kernel_cache):
    """For Triton kernel tests: TRITON_INTERPRET=1 for this test only (gpu-marked tests run the
    compiled kernels), so the variable never leaks into other tests."""
    monkeypatch.setenv("MEMSAVE_TRITON_CACHE", str(kernel_cache))
    if request.node.get_closest_marker("gpu"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
