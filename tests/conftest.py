"""What every test module shares: the test folder on ``sys.path`` (tests/host.py puts the real host
there and imports the pack), the CPU, and the fixtures several modules use."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="module")
def base():
    """The host's BaseModel + ModelPatcher of the authors' tiny UNet (``host.TINY_UNET``) with seeded
    weights (seed 0), one per test module; a module that needs other weights defines its own."""
    import host

    return host.build_model(host.TINY_UNET, seed=0)


@pytest.fixture
def unload_host_models():
    """The test starts and ends with nothing loaded by the host's memory manager (modules use it
    for every test with ``pytestmark = pytest.mark.usefixtures("unload_host_models")``)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    yield
    comfy.model_management.unload_all_models()
