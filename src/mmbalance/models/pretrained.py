"""Pretrained weights people already have, mapped onto our encoders.

``model.pretrained`` names a local state dict per modality. Besides an
encoder's own layout (``torch.save(encoder.state_dict(), path)``), the
``resnet18`` encoder reads torchvision's ResNet-18 layout, the ImageNet
weights most of the field starts from (``torch.save(torchvision.models.resnet18(
weights="IMAGENET1K_V1").state_dict(), path)`` on a machine with torchvision;
mmbalance never downloads). Their names map onto ours one to one:

    conv1, bn1                                  -> stem.0, stem.1
    layerN.M.{conv1,bn1,conv2,bn2}              -> stages.(N-1).M.{conv1,bn1,conv2,bn2}
    layerN.M.downsample.0, layerN.M.downsample.1 -> stages.(N-1).M.shortcut.0, .shortcut.1
    fc                                          -> ignored (ImageNet's classifier)

The first convolution reads RGB; for inputs with other channel counts
(1-channel spectrograms, 2-channel optical flow) its weights are averaged over
the three input channels and the mean repeated for every channel of ours:
TSN's cross-modality initialisation (Wang et al., ECCV 2016), which keeps
each filter's spatial pattern (timm's ``adapt_input_conv`` sums over RGB
for one channel instead: three times these weights).

What was loaded, adapted, ignored and left as initialised is a
``PretrainedReport`` (one line: ``summary()``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from ..errors import ConfigError

TORCHVISION_RESNET18 = "torchvision's ResNet-18"
_LAYER = re.compile(r"^layer([1-4])\.([01])\.(.+)$")
_BLOCK_PARTS = {"conv1", "bn1", "conv2", "bn2", "downsample.0", "downsample.1"}
#: tensors a state dict may lack without harm: counters that older PyTorch versions did not save
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


@dataclass
class PretrainedReport:
    """Which of an encoder's tensors came from a weights file, and what happened to the rest."""

    path: Path
    layout: str  # "own" or the foreign layout's name
    loaded: list[str] = field(default_factory=list)  # our keys set from the file
    not_loaded: list[str] = field(default_factory=list)  # our keys the file did not give: kept as initialised
    ignored: list[str] = field(default_factory=list)  # the file's keys with no place in our encoder
    adapted: list[str] = field(default_factory=list)  # conversions done on the way, in words

    def summary(self) -> str:
        total = len(self.loaded) + len(self.not_loaded)
        source = "its own layout" if self.layout == "own" else self.layout
        text = f"loaded {len(self.loaded)} of {total} tensors from {self.path} ({source})"
        if self.adapted:
            text += f"; {'; '.join(self.adapted)}"
        if self.ignored:
            text += f"; ignored {_listed(self.ignored)}"
        if self.not_loaded:
            text += f"; kept as initialised: {_listed(self.not_loaded)}"
        return text


def _listed(keys: list[str], shown: int = 4) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def torchvision_resnet_key(key: str) -> str | None:
    """Our name for a torchvision ResNet-18 key; None for the classifier (``fc.*``) and names it does not have."""
    if key.startswith("fc."):
        return None
    for theirs, ours in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    match = _LAYER.match(key)
    if match is None:
        return None
    layer, block, rest = match.groups()
    part, _, leaf = rest.rpartition(".")
    if part not in _BLOCK_PARTS:
        return None
    part = part.replace("downsample.", "shortcut.")
    return f"stages.{int(layer) - 1}.{block}.{part}.{leaf}"


def our_key_in_torchvision(key: str) -> str:
    """The torchvision name of one of our ResNet-18 keys (the inverse of ``torchvision_resnet_key``)."""
    for ours, theirs in (("stem.0.", "conv1."), ("stem.1.", "bn1.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    _, stage, block, rest = key.split(".", 3)
    return f"layer{int(stage) + 1}.{block}.{rest.replace('shortcut.', 'downsample.')}"


def looks_like_torchvision_resnet(state: dict) -> bool:
    return "conv1.weight" in state and any(key.startswith("layer1.") for key in state)


def from_torchvision_resnet(state: dict[str, Tensor], own: dict[str, Tensor], path: Path, kind: str) -> tuple[dict[str, Tensor], PretrainedReport]:
    """(our state dict, as far as the file gives it; the report) from a torchvision ResNet-18 state dict."""
    report = PretrainedReport(path=path, layout=TORCHVISION_RESNET18)
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            report.ignored.append(key)
            continue
        target = torchvision_resnet_key(key)
        if target is None or target not in own:
            raise ConfigError(
                f"{path} looks like {TORCHVISION_RESNET18} but has '{key}', which ResNet-18 does not "
                f"(a deeper ResNet?); the {kind} encoder reads ResNet-18 weights only"
            )
        if not isinstance(value, Tensor):
            raise ConfigError(f"'{key}' in {path} is a {type(value).__name__}, not a tensor")
        wanted = tuple(own[target].shape)
        if target == "stem.0.weight" and value.dim() == 4 and value.shape[1] == 3 and wanted[1] != 3:
            value = value.mean(dim=1, keepdim=True).repeat(1, wanted[1], 1, 1)
            report.adapted.append(f"conv1 averaged over its RGB inputs for {wanted[1]} input channel{'s' * (wanted[1] > 1)}")
        if tuple(value.shape) != wanted:
            raise ConfigError(
                f"'{key}' in {path} has shape {tuple(value.shape)}; the {kind} encoder's '{target}' needs {wanted}"
            )
        mapped[target] = value
        report.loaded.append(target)
    report.not_loaded = [key for key in own if key not in mapped]
    lacking = [key for key in report.not_loaded
               if key.startswith(("stem.", "stages.")) and not key.endswith(OPTIONAL_SUFFIXES)]
    if lacking:
        raise ConfigError(
            f"{path} holds only part of {TORCHVISION_RESNET18}: it lacks '{our_key_in_torchvision(lacking[0])}'"
            + (f" and {len(lacking) - 1} more" if len(lacking) > 1 else "")
        )
    return mapped, report
