"""Test setup: CPU only, fp32 matmuls exact, tiny configs built here (no network, no downloads)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # sharding tests
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# PyTorch's triton (pulled in by timm -> torchvision) segfaults when it loads after TensorFlow in the
# same process (tensorflow-cpu 2.21 / triton 3.8); loading it first is fine. Only the test process has
# both: the package never imports torch.
try:
    import timm  # noqa: F401
    import torch  # noqa: F401
except ImportError:
    pass

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from ovla_jax.models.config import tiny_openvla_config as tiny_config  # noqa: E402,F401


def pytest_configure(config):
    # A venv whose editable install points at another checkout imports that code, and its tests then
    # pass or fail for the wrong tree: refuse to run.
    import ovla_jax

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.dirname(os.path.dirname(os.path.abspath(ovla_jax.__file__)))
    if os.path.realpath(package) != os.path.realpath(here):
        raise pytest.UsageError(f"these tests are in {here} but `import ovla_jax` loads {ovla_jax.__file__}: "
                                f"reinstall this checkout (pip install -e {here})")
    config.addinivalue_line("markers", "slow: takes more than a few seconds; run with -m slow")
    config.addinivalue_line("markers", "torch: needs the [torch] extra (PyTorch, timm, transformers)")


@pytest.fixture(scope="session")
def tiny():
    return tiny_config()
