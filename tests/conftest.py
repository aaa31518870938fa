"""Shared fixtures. Real-data tests find ``shared/data`` through ``CTLESION_DATA_ROOT``
(default ``../shared/data`` next to the repository) and skip, saying why, when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("CTLESION_DATA_ROOT", REPO.parent / "shared" / "data"))


def author_fixtures_root() -> Path:
    """The author-code fixtures (``shared/fixtures/author``; ``CTLESION_SHARED_ROOT`` moves shared/)."""
    return Path(os.environ.get("CTLESION_SHARED_ROOT", REPO.parent / "shared")) / "fixtures" / "author"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real data root {root} is absent (set CTLESION_DATA_ROOT to run this test)")
    return root


@pytest.fixture(autouse=True)
def _threads_and_seed():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
