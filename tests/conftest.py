"""Test setup: poisoned kernel outputs, Triton's interpreter chosen before triton loads, the
device every kernel test runs on (CUDA when there is a GPU, else the CPU and the interpreter),
and the Pallas TPU variants kept in interpret mode on JAX's CPU device on a GPU host."""

import os

os.environ.setdefault("KC_POISON", "1")
# torch and JAX share the GPU in one test process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import kernels  # noqa: E402,F401,I001  (must precede any import of triton)
import pytest  # noqa: E402

from kernels.device import INTERPRET  # noqa: E402
from shared.check import kernel_device  # noqa: E402

try:  # the GPU check runs this suite on machines that may lack hypothesis
    from hypothesis import HealthCheck, settings
except ImportError:
    pass
else:
    settings.register_profile(
        "kc", deadline=None, max_examples=10, derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("kc")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: counts memory traffic, which only Triton's interpreter sees")


def pytest_collection_modifyitems(config, items):
    """Byte counting (shared.iocount) reads the interpreter's loads and stores; compiled
    kernels on a GPU have none to read. Such tests run wherever the interpreter does."""
    if INTERPRET:
        return
    skip = pytest.mark.skip(reason="counts bytes in Triton's interpreter (KC_INTERPRET=1 runs it)")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tpu_interpret_on_cpu(monkeypatch):
    """Run the Pallas kernels' TPU variants in interpret mode on JAX's CPU device, as a CPU
    host does. Where JAX's default backend is not a GPU that happens anyway: a no-op. On a GPU
    host the kernels would take the Triton lowering (the TPU layout then fails inside JAX) or,
    the TPU-only ones, refuse the GPU. So there, for the test: KC_INTERPRET=1 and
    KC_PALLAS_TARGET=tpu, which kernels.device.pallas_interpret and
    kernels.tpu_lowering.pallas_target read at every call (Triton read KC_INTERPRET once, at
    import: it stays compiled), and the CPU as JAX's default device, so arrays made in the test
    (jnp.asarray, jax.random) live and run there, in exact fp32. A test may still set
    KC_PALLAS_TARGET=gpu itself to check a refusal."""
    import jax

    if jax.default_backend() != "gpu":
        yield
        return
    monkeypatch.setenv("KC_INTERPRET", "1")
    monkeypatch.setenv("KC_PALLAS_TARGET", "tpu")
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture(scope="session")
def device() -> str:
    """"cuda" when a GPU is there and Triton is not forced into its interpreter, else "cpu"."""
    return kernel_device()
