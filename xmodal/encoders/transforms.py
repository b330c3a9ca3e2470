"""Image transforms shared by backbones: eval (resize + centre crop) and Tip-Adapter-style augmentation."""
from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def augment_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip: the cache augmentation of Tip-Adapter."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def describe(transform: T.Compose) -> str:
    """A stable textual description of a transform, used in cache keys."""
    return repr(transform).replace("\n", " ")
