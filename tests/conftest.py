"""Shared fixtures: offline mode, seeded RNGs, a tiny generated ImageFolder, the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Small-matrix tests run faster (and steadier on a busy 2-core machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} not present")
    return SHARED


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    from xmodal.bench.testing import make_tiny_imagefolder

    return make_tiny_imagefolder(tmp_path / "imgs", classes=3, train=8, test=4)
