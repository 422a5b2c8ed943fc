import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Tests never read or write the user's fitmap cache (calibration, simulated costs, the demo model).
os.environ["FITMAP_CACHE"] = tempfile.mkdtemp(prefix="fitmap-test-cache-")
atexit.register(shutil.rmtree, os.environ["FITMAP_CACHE"], ignore_errors=True)

from tests.tiny import make_checkpoint  # noqa: E402  (after FITMAP_CACHE is set: fitmap reads it)


@pytest.fixture(autouse=True)
def _reset_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Directory per tiny family, written once per test session."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_checkpoint(family, root / family)
        return cache[family]

    return get
