"""The stores the algorithm tests train on: seeded, tiny, built once per session and only read."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import tiny_store


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """200 training and 50 test images: the tiny federation of 4 clients (`common.config`)."""
    return tiny_store(tmp_path_factory.mktemp("stores"))


@pytest.fixture(scope="session")
def rank_store(tmp_path_factory) -> Path:
    """150 training and 30 test images: the mixed-rank federation of 3 clients (`common.rank_config`)."""
    return tiny_store(tmp_path_factory.mktemp("rank-stores"), num_train=150, num_test=30)
