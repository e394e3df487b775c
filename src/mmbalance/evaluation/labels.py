"""Words for the keys mmbalance logs, so that a figure's axes read as a paper's would.

The one place that turns a raw key (``val/accuracy``, ``midas/alpha``,
``loss/fused``, ``pmr/relative_score``) into an axis title: a few keys are
named by hand in ``KEY_LABELS``; any other key is made readable by rule (the
part's name in words as a prefix, underscores to spaces, ``(%)`` after an
accuracy, which every plot shows in %).
"""

from __future__ import annotations

#: keys whose axis title is written by hand; every other key is named by ``readable``'s rule
KEY_LABELS = {
    "epoch": "epoch",
    "train/accuracy": "training accuracy (%)",
    "val/accuracy": "validation accuracy (%)",
    "test/accuracy": "test accuracy (%)",
    "accuracy": "accuracy (%)",
    "train/loss": "training loss",
    "loss/fused": "fused loss",
    "val/modality_accuracy": "validation modality-only accuracy (%)",
    "test/modality_accuracy": "test modality-only accuracy (%)",
    "val/misaligned_confidence": "fused confidence in each modality's class\n(misaligned validation samples)",
    "midas/alpha": "α (weak-modality weight)",
    "corruption/level": "corruption level ε",
}

#: how a part's name is spelled in words where it is not simply its letters in capitals
PART_NAMES = {
    "joint": "joint",
    "unimodal": "unimodal",
    "cal_accel": "CAL acceleration",
    "gblending": "G-Blending",
    "greedy": "greedy",
    "inforeg": "InfoReg",
    "lemda": "LeMDA",
    "amco": "AMCo",
    "mixup": "mixup",
    "mmcosine": "MMCosine",
    "mmpareto": "MMPareto",
    "powmix": "PowMix",
    "reconboost": "ReconBoost",
    "relearning": "re-learning",
}


def part_name(name: str) -> str:
    """A part's name in words: ``ogm_ge`` -> ``OGM-GE``, ``mmpareto`` -> ``MMPareto``."""
    return PART_NAMES.get(name, name.upper().replace("_", "-"))


def is_accuracy(key: str) -> bool:
    """Whether a key holds an accuracy (a fraction that plots show in %)."""
    return "accuracy" in key.split("/")[-1]


def readable(key: str) -> str:
    """The axis title for a logged key; by rule when ``KEY_LABELS`` does not name it.

    ``loss/misaligned`` -> ``misaligned loss``; ``pmr/relative_score`` -> ``PMR relative score``;
    ``dgl/unimodal_accuracy`` -> ``DGL unimodal accuracy (%)``.
    """
    if key in KEY_LABELS:
        return KEY_LABELS[key]
    head, _, rest = key.partition("/")
    words = rest.replace("/", " ").replace("_", " ").strip()
    if not words:
        label = head.replace("_", " ")
    elif head == "loss":
        label = f"{words} loss"
    else:
        label = f"{part_name(head)} {words}".strip()
    return f"{label} (%)" if is_accuracy(key) else label
