"""Content fingerprints of torch modules: cheap, and different whenever the weights differ."""
from __future__ import annotations

import hashlib

import torch


def module_fingerprint(*modules: torch.nn.Module, extra: str = "") -> str:
    """Hash of every parameter/buffer's name, shape, sum, abs-sum and first/last values."""
    h = hashlib.sha256(extra.encode())
    for module in modules:
        for name, t in list(module.state_dict().items()):
            if not torch.is_tensor(t) or t.numel() == 0:
                continue
            flat = t.detach().flatten().double()
            stats = torch.stack([flat.sum(), flat.abs().sum(), flat[0], flat[-1]]).cpu().tolist()
            h.update(f"{name}{tuple(t.shape)}{[round(v, 6) for v in stats]}".encode())
    return h.hexdigest()[:20]
