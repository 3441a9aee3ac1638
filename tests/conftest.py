"""Test setup: poisoned kernel outputs, and Triton's interpreter chosen before triton loads."""

import os

os.environ.setdefault("KC_POISON", "1")

import kernels  # noqa: E402,F401,I001  (must precede any import of triton)
from hypothesis import HealthCheck, settings  # noqa: E402,I001

settings.register_profile(
    "kc", deadline=None, max_examples=10, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kc")
