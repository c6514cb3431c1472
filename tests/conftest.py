"""Shared test set-up: offline environment, seeds, and small helpers. Nothing here is a mock."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

import vilref_fed  # noqa: F401  (pins HF_HUB_OFFLINE etc. before transformers is imported)

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass
    yield
