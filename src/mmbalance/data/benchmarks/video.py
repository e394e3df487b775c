"""UCF101 action recognition from RGB frames and optical flow (two-stream layout).

The layout is that of the widely shared two-stream preprocessing (RGB
frames ``jpegs_256`` and TV-L1 flow ``tvl1_flow/{u,v}`` as gray JPEGs, one
folder per video) with the official ``ucfTrainTestlist``. Flow JPEGs map
displacement to 0..255 around 128; they are scaled to [-1, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field

from ...errors import DataError
from ...registry import DATASETS
from ..base import DataBundle
from ..loading import data_root
from .common import (
    RESNET_SGD_DEFAULTS,
    FileConfig,
    bundle_from_records,
    class_index,
    inside_root,
    read_numbered_rows,
    read_rows,
    require_dir,
)
from .media import FramesReader, normalise_gray, pick_frames, probe_image, read_image

LAYOUT = (
    "ROOT/ucfTrainTestlist/{classInd.txt,trainlist0N.txt,testlist0N.txt}, ROOT/jpegs_256/<video>/*.jpg "
    "and ROOT/tvl1_flow/{u,v}/<video>/*.jpg"
)


class FlowReader:
    """``frames`` flow fields, evenly spaced, as ``(T, 2, S, S)``.

    Channel 0 is the ``u/`` image, channel 1 the ``v/`` image of the same name.
    """

    def __init__(self, frames: int, size: int):
        self.frames, self.size = frames, size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.frames, 2, self.size, self.size)

    def _pairs(self, record: dict) -> list[tuple[Path, Path]]:
        v_dir = Path(record["flow_v"])
        return [(u, v_dir / u.name) for u in pick_frames(Path(record["flow_u"]), self.frames)]

    def probe(self, record: dict) -> None:
        for u, v in self._pairs(record):
            probe_image(u)
            probe_image(v)

    def __call__(self, record: dict) -> torch.Tensor:
        fields = [
            np.concatenate([read_image(u, "L", self.size), read_image(v, "L", self.size)], axis=2)
            for u, v in self._pairs(record)
        ]
        return torch.stack([normalise_gray(field) for field in fields])


def video_name(entry: str) -> tuple[str, str]:
    """``'ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi'`` -> ``('ApplyEyeMakeup', 'v_ApplyEyeMakeup_g08_c01')``."""
    folder, _, file = entry.replace("\\", "/").rpartition("/")
    return folder, file.rsplit(".", 1)[0]


@DATASETS.register("ucf101")
class UCF101:
    """UCF101: 13,320 videos, RGB frames + optical flow, 101 actions (two-stream layout, official splits).

    Layout under ``data.root``::

        ucfTrainTestlist/classInd.txt       "1 ApplyEyeMakeup" per line
        ucfTrainTestlist/trainlist01.txt    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1" (02, 03 for splits 2, 3)
        ucfTrainTestlist/testlist01.txt     "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
        jpegs_256/v_ApplyEyeMakeup_g08_c01/frame000001.jpg ...
        tvl1_flow/u/v_ApplyEyeMakeup_g08_c01/frame000001.jpg ...   (and tvl1_flow/v/, same names)

    ``ucf101.split`` picks the official split; validation is a stratified part
    of its train list (videos of one group may then be in both).
    """

    class Config(FileConfig):
        split: Literal[1, 2, 3] = Field(1, description="official train/test split")
        rgb_frames: int = Field(3, ge=1, description="RGB frames per video, evenly spaced")
        flow_frames: int = Field(3, ge=1, description="flow fields (u, v) per video, evenly spaced")
        image_size: int = Field(224, ge=8, description="frames are resized to image_size x image_size")
        num_classes: Optional[int] = Field(101, ge=2, description="expected number of classes; null accepts any")

    defaults = dict(RESNET_SGD_DEFAULTS)

    @classmethod
    def load(cls, config) -> DataBundle:
        options = config.section("ucf101")
        root = data_root(config, "ucf101")
        require_dir(root, "ucf101", LAYOUT)
        lists = root / "ucfTrainTestlist"
        needed = [lists / "classInd.txt", lists / f"trainlist0{options.split}.txt"]
        needed += [lists / f"testlist0{options.split}.txt", root / "jpegs_256"]
        needed += [root / "tvl1_flow" / "u", root / "tvl1_flow" / "v"]
        missing = [p for p in needed if not p.exists()]
        if missing:
            what = missing[0].relative_to(root)
            raise DataError(f"{root} does not have the ucf101 layout: no {what} (expected {LAYOUT})")
        class_rows = read_rows(lists / "classInd.txt", " ")
        if any(len(row) < 2 for row in class_rows):
            raise DataError(f"{lists / 'classInd.txt'} must have 'number name' on every line (expected {LAYOUT})")
        index = class_index([row[1] for row in class_rows], options.num_classes, "classInd.txt", "ucf101.num_classes")
        splits = {}
        for split, file in (("train", f"trainlist0{options.split}.txt"), ("test", f"testlist0{options.split}.txt")):
            records = []
            for line, row in read_numbered_rows(lists / file, " "):
                inside_root(root, row[0], lists / file, line)
                folder, video = video_name(row[0])
                if folder not in index:
                    raise DataError(f"{lists / file}: {row[0]} is in class folder {folder!r}, which classInd.txt lacks")
                inside_root(root, video, lists / file, line)  # 'x/...avi' names the video '..'
                records.append({
                    "rgb": str(root / "jpegs_256" / video),
                    "flow_u": str(root / "tvl1_flow" / "u" / video),
                    "flow_v": str(root / "tvl1_flow" / "v" / video),
                    "label": index[folder],
                    "video": video,
                })
            splits[split] = records
        rgb = FramesReader("rgb", options.rgb_frames, options.image_size)
        flow = FlowReader(options.flow_frames, options.image_size)
        return bundle_from_records(
            config,
            "ucf101",
            splits,
            {"rgb": rgb, "flow": flow},
            {"rgb": rgb.probe, "flow": flow.probe},
            {"rgb": rgb.shape, "flow": flow.shape},
            sorted(index, key=index.get),
            {"root": str(root), "split": options.split},
        )
