"""The engine seam: a backbone's runner is handed the backbone on every call, so a copy of a backbone with its
own modules (as the tower-training methods make) runs those modules, as it did when engine state lived on
the backbone."""
from __future__ import annotations

import copy

import torch

from xmodal.backbones import load_backbone
from xmodal.encoders import VisionLanguageBackbone, build_backbone


def test_a_shallow_copy_runs_its_own_modules():
    bb = load_backbone("tiny:clip", engine="torch")
    view = copy.copy(bb)
    view.image_net = copy.deepcopy(bb.image_net)
    with torch.no_grad():
        view.image_net[0].weight.mul_(2.0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        mine = view.torch_tower("image")(x)
    torch.testing.assert_close(view.encode_images(x), mine, rtol=0, atol=1e-6)  # channels-last may round apart
    assert not torch.allclose(view.encode_images(x), bb.encode_images(x))


def test_the_runner_keeps_no_backbone_and_a_bare_encoder_runs_pytorch():
    bb = load_backbone("tiny:clip", engine="onnx")
    assert not any(isinstance(v, VisionLanguageBackbone) for v in vars(bb.runner).values())
    bare = build_backbone("tiny:clip")
    assert bare.runner is None and bare.engine == "torch" and bare.active_engine() == "torch"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bare.encode_images(x), bb.encode_images(x), rtol=0, atol=1e-5)
