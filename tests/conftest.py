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


@pytest.fixture
def tiny_openclip_vit(tmp_path):
    """A 1-layer random-weight open_clip ViT registered under a test name and saved to a weights file:
    returns (model, weights path, spec), so tests load it through the real ``openclip:`` spec."""
    import json

    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "XmodalTinyViT.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "XmodalTinyViT.json")
    torch.manual_seed(0)
    model = open_clip.create_model("XmodalTinyViT", pretrained=None)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return model, weights, f"openclip:XmodalTinyViT/{weights}"
