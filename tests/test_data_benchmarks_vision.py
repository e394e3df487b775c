"""NYUD2 (RGB + depth) and UCF101 (RGB + flow) loaders on tiny fixtures in their exact layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmbalance.data  # noqa: F401
from mmbalance.config import build_config
from mmbalance.data import load_dataset
from mmbalance.errors import DataError


def load(name, root, *extra):
    return load_dataset(build_config(overrides=[f"data.root={root}", *extra], dataset=name))


def write_pair(path, depth_level):
    """RGB noise on the left half, a flat depth level on the right, as in nyud2_trainvaltest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :8] = np.random.default_rng(depth_level).integers(0, 255, (8, 8, 3))
    pixels[:, 8:] = depth_level
    Image.fromarray(pixels).save(path)


def test_nyud2_views_labels_and_splits(tmp_path):
    with pytest.raises(DataError, match=r"does not have the nyud2 layout: no train/ folder \(expected ROOT/\{train,test\}/<class>/<image>.png"):
        load("nyud2", tmp_path)
    scenes = ["bedroom", "kitchen"]
    for s, scene in enumerate(scenes):
        for k in range(6):
            write_pair(tmp_path / "train" / scene / f"{k}.png", depth_level=255 * s)
        write_pair(tmp_path / "test" / scene / "t.png", depth_level=255 * s)
    bundle = load("nyud2", tmp_path, "nyud2.image_size=8", "nyud2.num_classes=null", "data.val_fraction=0.34")
    assert bundle.modalities == ["rgb", "depth"] and bundle.class_names == scenes
    assert bundle.input_shapes == {"rgb": (3, 8, 8), "depth": (1, 8, 8)}
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 4, 2)
    sample = bundle.test[1]
    assert sample["label"] == 1 and torch.allclose(sample["depth"], torch.ones(1, 8, 8))
    assert torch.allclose(bundle.test[0]["depth"], -torch.ones(1, 8, 8))
    with pytest.raises(DataError, match=r"^the nyud2 train folder name 2 classes, expected 10"):
        load("nyud2", tmp_path)
    (tmp_path / "test" / "office").mkdir()
    with pytest.raises(DataError, match=r"has class folder 'office', which train lacks"):
        load("nyud2", tmp_path, "nyud2.num_classes=null")


def write_gray_frames(folder, count, level):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.fromarray(np.full((6, 6), level, dtype=np.uint8), "L").save(folder / f"frame{k + 1:06d}.jpg")


def make_ucf(root, actions=("ApplyEyeMakeup", "Biking")):
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{k + 1} {a}\n" for k, a in enumerate(actions)))
    train, test = [], []
    for k, action in enumerate(actions):
        for group in range(1, 6):
            video = f"v_{action}_g{group:02d}_c01"
            write_gray_frames(root / "jpegs_256" / video, 4, 100)
            write_gray_frames(root / "tvl1_flow" / "u" / video, 3, 255)
            write_gray_frames(root / "tvl1_flow" / "v" / video, 3, 0)
            if group == 1:
                test.append(f"{action}/{video}.avi")
            else:
                train.append(f"{action}/{video}.avi {k + 1}")
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")


def test_ucf101_rgb_and_flow(tmp_path):
    make_ucf(tmp_path)
    options = ["ucf101.image_size=8", "ucf101.num_classes=null", "ucf101.flow_frames=2", "data.val_fraction=0.25"]
    bundle = load("ucf101", tmp_path, *options)
    assert bundle.modalities == ["rgb", "flow"]
    assert bundle.input_shapes == {"rgb": (3, 3, 8, 8), "flow": (2, 2, 8, 8)}
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 2, 2)
    assert [r["video"] for r in bundle.test.records] == ["v_ApplyEyeMakeup_g01_c01", "v_Biking_g01_c01"]
    flow = bundle.test[1]["flow"]
    assert flow.shape == (2, 2, 8, 8) and bundle.test[1]["label"] == 1
    assert torch.allclose(flow[:, 0], torch.ones(2, 8, 8), atol=0.02)  # u = 255 -> +1
    assert torch.allclose(flow[:, 1], -torch.ones(2, 8, 8), atol=0.02)  # v = 0 -> -1
    (tmp_path / "tvl1_flow" / "v" / "v_Biking_g03_c01" / "frame000003.jpg").unlink()
    with pytest.raises(DataError, match=r"^image file not found: .*tvl1_flow/v/v_Biking_g03_c01/frame000003.jpg$"):
        load("ucf101", tmp_path, *options)
    skipped = load("ucf101", tmp_path, *options, "data.on_error=skip")
    assert skipped.info["skipped"] == 1 and len(skipped.train) + len(skipped.val) == 7
    with pytest.raises(DataError, match=r"does not have the ucf101 layout: no ucfTrainTestlist/trainlist02.txt \(expected ROOT/ucfTrainTestlist/"):
        load("ucf101", tmp_path, *options, "ucf101.split=2")
