"""NYU Depth V2 scene recognition (RGB + depth), in the layout QMF and TMC use.

Each sample is one image holding the RGB view on the left half and the
depth view (stored as an image) on the right half, in a folder per scene
class; this is the ``nyud2_trainvaltest`` release those papers train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from ...errors import DataError
from ...registry import DATASETS
from ..base import DataBundle
from ..loading import data_root
from .common import RESNET_SGD_DEFAULTS, FileConfig, bundle_from_records, class_index, require_dir
from .media import IMAGE_SUFFIXES, normalise_gray, normalise_rgb, probe_image, read_image

LAYOUT = "ROOT/{train,test}/<class>/<image>.png (optional val/), each image RGB on the left half and depth on the right"


class HalfReader:
    """One half of a side-by-side RGB|depth image, resized: left as RGB ``(3, S, S)``, right as depth ``(1, S, S)``."""

    def __init__(self, half: str, size: int):
        self.half, self.size = half, size

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3 if self.half == "left" else 1, self.size, self.size)

    def probe(self, record: dict) -> None:
        probe_image(Path(record["image"]))

    def __call__(self, record: dict) -> torch.Tensor:
        path = Path(record["image"])
        pair = read_image(path, "RGB")
        width = pair.shape[1] // 2
        if width == 0:
            raise DataError(f"image file {path} is too narrow to hold RGB and depth side by side")
        if self.half == "left":
            return normalise_rgb(_resize(pair[:, :width], self.size))
        depth = _resize(pair[:, width : 2 * width], self.size).mean(axis=2, keepdims=True)
        return normalise_gray(depth)


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray((array * 255).round().astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def scan(folder: Path, index: dict[str, int]) -> list[dict]:
    records = []
    for name in sorted(index):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            records.append({"image": str(path), "label": index[name]})
    unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in index)
    if unknown:
        raise DataError(f"{folder} has class folder '{unknown[0]}', which train lacks (expected {LAYOUT})")
    return records


@DATASETS.register("nyud2")
class NYUD2:
    """NYU Depth V2: indoor scenes, RGB + depth, 10 classes (QMF/TMC side-by-side layout).

    Layout under ``data.root`` (``nyud2_trainvaltest``)::

        train/<class>/<name>.png   RGB on the left half, depth on the right half
        val/<class>/...            optional; without it a stratified part of train
        test/<class>/...

    Classes are the sorted train folder names; ``nyud2.num_classes`` (10) is
    checked. RGB is ImageNet-normalised ``(3, S, S)``; depth is the gray
    level of its half, scaled to [-1, 1], ``(1, S, S)``.
    """

    class Config(FileConfig):
        image_size: int = Field(224, ge=8, description="both views are resized to image_size x image_size")
        num_classes: Optional[int] = Field(10, ge=2, description="expected number of classes; null accepts any")

    defaults = dict(RESNET_SGD_DEFAULTS)

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section("nyud2")
        root = data_root(config, "nyud2")
        require_dir(root, "nyud2", LAYOUT)
        missing = [s for s in ("train", "test") if not (root / s).is_dir()]
        if missing:
            raise DataError(f"{root} does not have the nyud2 layout: no {missing[0]}/ folder (expected {LAYOUT})")
        names = [d.name for d in (root / "train").iterdir() if d.is_dir()]
        index = class_index(names, options.num_classes, "the nyud2 train folder", "nyud2.num_classes")
        splits = {s: scan(root / s, index) for s in ("train", "val", "test") if (root / s).is_dir()}
        rgb, depth = HalfReader("left", options.image_size), HalfReader("right", options.image_size)
        return bundle_from_records(
            config,
            "nyud2",
            splits,
            {"rgb": rgb, "depth": depth},
            {"rgb": rgb.probe, "depth": depth.probe},
            {"rgb": rgb.shape, "depth": depth.shape},
            sorted(index, key=index.get),
            {"root": str(root)},
        )
