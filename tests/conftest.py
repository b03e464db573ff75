"""Test-session set-up: 8 simulated CPU devices, so sharded code paths run everywhere."""

import os
import pathlib

import pytest

from kdjax import platform  # noqa: E402  (imports no JAX)

os.environ.setdefault("XLA_FLAGS", platform.cpu_device_flags("", 8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO
