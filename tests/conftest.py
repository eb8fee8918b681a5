from __future__ import annotations

import os

import pytest

# Keep Ray (Flower's simulation engine) on loopback in every test, whichever module imports it first.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from robustlab.paths import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """The staged real data folder (``../shared/data``); tests that need it skip cleanly when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared/data is not present beside the checkout")
    return path
