"""The CoOp data convention used by every paper in this field.

``$ROOT/<folder>/`` holds the images and ``split_zhou_<Name>.json`` =
``{"train"|"val"|"test": [[relpath, label, classname], ...]}`` (paths relative to the image folder).
ImageNet and FGVCAircraft use their own files; the ImageNet shift sets are test-only folders.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from .base import ImageDataset, Sample
from .paths import ContainedPaths
from .templates import IMAGENET_7


@dataclass(frozen=True)
class CoopInfo:
    folder: str
    image_dir: str
    split_file: str | None  # None: dataset-specific loader (ImageNet family, FGVCAircraft)
    templates: list[str] = field(default_factory=list)
    kind: str = "split-json"  # split-json | imagenet | fgvc | imagenet-shift


COOP_DATASETS: dict[str, CoopInfo] = {
    "ImageNet": CoopInfo("imagenet", "images", None, IMAGENET_7, "imagenet"),
    "Caltech101": CoopInfo("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", ["a photo of a {}."]),
    "OxfordPets": CoopInfo("oxford_pets", "images", "split_zhou_OxfordPets.json", ["a photo of a {}, a type of pet."]),
    "StanfordCars": CoopInfo("stanford_cars", "", "split_zhou_StanfordCars.json", ["a photo of a {}."]),
    "Flowers102": CoopInfo("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", ["a photo of a {}, a type of flower."]),
    "Food101": CoopInfo("food-101", "images", "split_zhou_Food101.json", ["a photo of {}, a type of food."]),
    "FGVCAircraft": CoopInfo("fgvc_aircraft", "images", None, ["a photo of a {}, a type of aircraft."], "fgvc"),
    "SUN397": CoopInfo("sun397", "SUN397", "split_zhou_SUN397.json", ["a photo of a {}."]),
    "DTD": CoopInfo("dtd", "images", "split_zhou_DescribableTextures.json", ["{} texture."]),
    "EuroSAT": CoopInfo("eurosat", "2750", "split_zhou_EuroSAT.json", ["a centered satellite photo of {}."]),
    "UCF101": CoopInfo("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", ["a photo of a person doing {}."]),
    # Distribution-shift test sets for a model adapted on ImageNet (class names from ImageNet's classnames.txt).
    "ImageNetV2": CoopInfo("imagenetv2", "imagenetv2-matched-frequency-format-val", None, IMAGENET_7, "imagenet-shift"),
    "ImageNetSketch": CoopInfo("imagenet-sketch", "images", None, IMAGENET_7, "imagenet-shift"),
    "ImageNetA": CoopInfo("imagenet-adversarial", "imagenet-a", None, IMAGENET_7, "imagenet-shift"),
    "ImageNetR": CoopInfo("imagenet-rendition", "imagenet-r", None, IMAGENET_7, "imagenet-shift"),
}

STANDARD_11 = [n for n, info in COOP_DATASETS.items() if info.kind != "imagenet-shift"]


def _lookup(name: str) -> tuple[str, CoopInfo]:
    for key, info in COOP_DATASETS.items():
        if key.lower() == name.lower() or info.folder == name.lower():
            return key, info
    raise DatasetError(f"unknown CoOp dataset {name!r}; known: {', '.join(COOP_DATASETS)}")


def _read_text(path: Path) -> str:
    """A split / metadata file as UTF-8 text; unreadable or binary files are a DatasetError naming them."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                           hint="restore the original split / metadata file") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}",
                           hint="check that the file exists and is readable") from None


def _read_classnames_txt(path: Path) -> tuple[list[str], list[str]]:
    """CoOp's ImageNet ``classnames.txt``: one ``<wnid> <class name>`` per line, in label order."""
    if not path.is_file():
        raise DatasetError(f"{path} not found: the ImageNet family needs CoOp's classnames.txt "
                           "(lines '<wnid> <class name>') in the dataset folder or in $ROOT/imagenet/")
    wnids, names = [], []
    for line in _read_text(path).splitlines():
        if line.strip():
            wnid, _, cls = line.strip().partition(" ")
            wnids.append(wnid)
            names.append(cls.strip())
    return wnids, names


class CoopDataset(ImageDataset):
    def __init__(self, name: str, root: str | Path) -> None:
        self.key, self.info = _lookup(name)
        self.root = Path(root).expanduser()
        self.dir = self.root / self.info.folder
        if not self.dir.is_dir():
            raise DatasetError(f"{self.key}: folder {self.dir} not found. Lay the data out as CoOp does "
                               f"($ROOT/{self.info.folder}/{self.info.image_dir} + split file); see docs/datasets.md")
        self.name = f"coop:{self.key}"
        self.templates = list(self.info.templates)
        self._splits = self._load()
        self.classnames = self._classnames

    # ---------------------------------------------------------------- loaders per kind
    def _load(self) -> dict[str, list[Sample]]:
        kind = self.info.kind
        if kind == "split-json":
            return self._load_split_json()
        if kind == "fgvc":
            return self._load_fgvc()
        return self._load_imagenet_like()

    def _load_split_json(self) -> dict[str, list[Sample]]:
        split_path = self.dir / self.info.split_file
        if not split_path.is_file():
            raise DatasetError(f"{self.key}: split file {split_path} not found (CoOp's {self.info.split_file})")
        try:
            raw = json.loads(_read_text(split_path))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{split_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise DatasetError(f"{split_path} must be a JSON object {{\"train\"|\"val\"|\"test\": "
                               f"[[relpath, label, classname], ...]}}, got {type(raw).__name__}")
        names: dict[int, str] = {}
        out: dict[str, list[Sample]] = {}
        img_root = ContainedPaths(self.dir / self.info.image_dir, split_path)
        for split in ("train", "val", "test"):
            rows = raw.get(split, [])
            if not isinstance(rows, list):
                raise DatasetError(f"{split_path}: {split!r} must be a list of [relpath, label, classname]")
            if rows:
                out[split] = []
                for item in rows:
                    if not isinstance(item, list) or len(item) != 3 or isinstance(item[1], bool) \
                            or not isinstance(item[1], int) or item[1] < 0 or not isinstance(item[0], str) \
                            or not isinstance(item[2], str):
                        raise DatasetError(f"{split_path}: entries must be [relpath, label, classname] with an "
                                           f"integer label >= 0, got {item!r}")
                    rel, label, cls = item
                    if names.setdefault(int(label), cls) != cls:
                        raise DatasetError(f"{split_path}: label {label} is called both {names[int(label)]!r} and "
                                           f"{cls!r}", hint="give each label one class name in the split file")
                    out[split].append(Sample(id=rel, label=int(label), path=str(img_root.join(rel))))
        if not names:
            raise DatasetError(f"{split_path} has no samples")
        n = max(names) + 1
        missing = [i for i in range(n) if i not in names]
        if missing:
            raise DatasetError(f"{split_path}: labels {missing[:5]} never appear; labels must be 0..{n - 1}")
        self._classnames = [names[i] for i in range(n)]
        return out

    def _load_fgvc(self) -> dict[str, list[Sample]]:
        variants_file = self.dir / "variants.txt"
        if not variants_file.is_file():
            raise DatasetError(f"FGVCAircraft: {variants_file} not found (use the official fgvc-aircraft-2013b data/ folder)")
        self._classnames = [v.strip() for v in _read_text(variants_file).splitlines() if v.strip()]
        label_of = {c: i for i, c in enumerate(self._classnames)}
        out = {}
        for split in ("train", "val", "test"):
            f = self.dir / f"images_variant_{split}.txt"
            if not f.is_file():
                raise DatasetError(f"FGVCAircraft: {f} not found")
            out[split] = []
            images = ContainedPaths(self.dir / self.info.image_dir, f)
            for line in _read_text(f).splitlines():
                if line.strip():
                    img, _, variant = line.strip().partition(" ")
                    if variant not in label_of:
                        raise DatasetError(f"FGVCAircraft: {f} names variant {variant!r}, which is not in {variants_file}")
                    out[split].append(Sample(id=f"{img}.jpg", label=label_of[variant],
                                             path=str(images.join(f"{img}.jpg"))))
        return out

    def _load_imagenet_like(self) -> dict[str, list[Sample]]:
        txt = self.dir / "classnames.txt"
        if not txt.is_file():
            txt = self.root / "imagenet" / "classnames.txt"
        wnids, names = _read_classnames_txt(txt)
        self._classnames = names
        img_root = self.dir / self.info.image_dir

        def folder_samples(base: Path, prefix: str, folders: list[str]) -> list[Sample]:
            out = []
            inside = ContainedPaths(base, txt)
            for label, folder in enumerate(folders):
                d = base / inside.component(folder)
                if d.is_dir():
                    out.extend(Sample(id=f"{prefix}/{folder}/{f.name}", label=label,
                                      path=str(inside.join(f"{folder}/{f.name}")))
                               for f in sorted(d.iterdir()) if f.is_file())
            return out

        if self.info.kind == "imagenet":
            return {"train": folder_samples(img_root / "train", "train", wnids),
                    "test": folder_samples(img_root / "val", "val", wnids)}
        # shift sets: ImageNetV2 uses folders named by label index, the others by wnid
        folders = [str(i) for i in range(len(wnids))] if self.key == "ImageNetV2" else wnids
        return {"test": folder_samples(img_root, "test", folders)}

    # ---------------------------------------------------------------- protocol
    def splits(self) -> list[str]:
        return list(self._splits)

    def samples(self, split: str) -> list[Sample]:
        if split not in self._splits:
            raise DatasetError(f"{self.name} has no split {split!r}; available: {list(self._splits)}")
        return self._splits[split]
