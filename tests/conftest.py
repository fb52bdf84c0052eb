import os

import pytest
import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every compile in the tests checks the graph invariants after every pass (docs/invariants.md).
os.environ.setdefault("MEMSAVE_DEBUG", "1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits from earlier tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
