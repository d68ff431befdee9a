"""Fixtures for every test: a fixed global seed. Shared helpers live in ``helpers.py``, block
cases in ``cases/``, data files in ``data/`` (``tests/`` is on the path: pyproject.toml)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
