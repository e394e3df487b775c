"""A finished run's predictions on new inputs (``mmbalance predict``, ``Run.predict``).

New inputs are read the way the ``npz`` dataset reads its arrays (floats as
float32 features, integers as token ids, a 1-d array as one feature per
sample), checked against the run's modalities, sample shapes and kinds with
one-line errors, and standardised with the training statistics the run stored
in ``best.pt``, so the features as the data file holds them get the
predictions the run makes on its own data. Besides the class probabilities of
the run's prediction, each modality-only prediction is the fused head with
every other modality's features zeroed: the readout behind the modality-only
accuracy of ``metrics.json`` (``models.readouts.zeroed_logits``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.npz import RESERVED, check_labels, integer_labels, modality_tensor, read_npz
from .data.standardise import Standardisation
from .errors import DataError, MMBalanceError
from .files import atomic_write_text
from .models.readouts import zeroed_logits


@dataclass
class Predictions:
    """The run's class probabilities and, per modality, the modality-only predicted class."""

    probabilities: Tensor  # [N, C]
    modality_only: dict[str, Tensor]  # modality -> [N] class ids
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.probabilities.shape[0])

    @property
    def classes(self) -> Tensor:
        """[N] the predicted class ids."""
        return self.probabilities.argmax(dim=1)

    def accuracy(self, labels: Tensor | np.ndarray) -> dict:
        """Accuracy of the prediction and of each modality-only prediction against ``labels``."""
        labels = torch.as_tensor(np.asarray(labels)).long()
        if labels.shape != (len(self),):
            raise DataError(f"{len(self)} predictions need {len(self)} labels, got an array of shape {tuple(labels.shape)}")
        check_labels(labels.numpy(), self.probabilities.shape[1], "the labels")

        def share(predicted: Tensor) -> float:
            return float((predicted == labels).double().mean()) if len(labels) else float("nan")

        return {"accuracy": share(self.classes), "modality_accuracy": {m: share(p) for m, p in self.modality_only.items()}}

    def csv_text(self, labels: Tensor | np.ndarray | None = None) -> str:
        """One row per sample: index, [label], predicted (and its name), every class's probability, each modality-only class."""
        names = self.class_names
        num_classes = self.probabilities.shape[1]
        tags = names if names and len(set(names)) == len(names) == num_classes else [str(k) for k in range(num_classes)]
        header = ["index", *(["label"] if labels is not None else []), "predicted", *(["predicted_name"] if names else [])]
        header += [f"probability_{tag}" for tag in tags]
        for m in self.modality_only:
            header += [f"{m}_only", *([f"{m}_only_name"] if names else [])]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        classes = self.classes.tolist()
        only = {m: p.tolist() for m, p in self.modality_only.items()}
        given = None if labels is None else np.asarray(labels).tolist()
        for i, (k, row) in enumerate(zip(classes, self.probabilities.tolist())):
            line = [i, *([given[i]] if given is not None else []), k, *([names[k]] if names else [])]
            line += [format(p, ".9g") for p in row]
            for m in self.modality_only:
                line += [only[m][i], *([names[only[m][i]]] if names else [])]
            writer.writerow(line)
        return out.getvalue()

    def write_csv(self, path: str | Path, labels: Tensor | np.ndarray | None = None, overwrite: bool = False) -> Path:
        """The CSV written atomically (never half-written); an existing file is kept unless ``overwrite``."""
        path = Path(path)
        refuse_existing(path, overwrite)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MMBalanceError(f"cannot write {path}: {exc.strerror or exc}") from None
        atomic_write_text(path, self.csv_text(labels))
        return path


def refuse_existing(path: Path, overwrite: bool) -> None:
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise MMBalanceError(f"{path} exists already; pass --overwrite (overwrite=True) to replace it")


def describe(shape: Sequence[int], dtype: torch.dtype | None) -> str:
    """``(N, 8) float features`` or ``(N, 7) integer token ids``: what the run reads for a modality."""
    kind = "integer token ids" if dtype is not None and not dtype.is_floating_point else "float features"
    return "(" + ", ".join(["N", *(str(size) for size in shape)]) + f") {kind}"


def check_inputs(
    inputs: Mapping[str, Tensor | np.ndarray],
    modalities: list[str],
    input_shapes: Mapping[str, Sequence[int]],
    input_dtypes: Mapping[str, torch.dtype],
) -> dict[str, Tensor]:
    """The inputs as the run's tensors (float32 features, int64 token ids), or one line on what does not fit."""
    expected = ", ".join(f"{m} {describe(input_shapes[m], input_dtypes.get(m))}" for m in modalities)
    unknown = [name for name in inputs if name not in modalities]
    if unknown:
        raise DataError(f"'{unknown[0]}' is not a modality of the run, which reads {expected}")
    missing = [m for m in modalities if m not in inputs]
    if missing:
        m = missing[0]
        raise DataError(f"modality '{m}' is missing: the run expects {describe(input_shapes[m], input_dtypes.get(m))} for it")
    arrays = {m: as_array(m, inputs[m]) for m in modalities}
    counts = {m: (int(a.shape[0]) if a.ndim else 0) for m, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"every modality needs the same number of samples, got {counts}")
    count = counts[modalities[0]]
    tensors = {}
    for m in modalities:
        shape, dtype = tuple(input_shapes[m]), input_dtypes.get(m)
        array = arrays[m]
        wants_ids = dtype is not None and not dtype.is_floating_point
        is_ids = np.issubdtype(array.dtype, np.integer)
        is_number = is_ids or np.issubdtype(array.dtype, np.floating) or array.dtype == np.bool_
        if not is_number or (wants_ids and not is_ids) or (not wants_ids and is_ids and dtype is not None):
            raise DataError(f"modality '{m}' holds {array.dtype} values; the run expects {describe(shape, dtype)}")
        sample_shape = tuple(array.shape[1:]) if array.ndim > 1 else (1,)
        if sample_shape != shape:
            raise DataError(f"modality '{m}' has samples of shape {sample_shape}; the run expects {describe(shape, dtype)}")
        tensors[m] = modality_tensor(m, array, count)
    return tensors


def as_array(modality: str, values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        values = (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    array = np.asarray(values)
    if array.ndim == 0:
        raise DataError(f"modality '{modality}' is a scalar; expected one row per sample")
    return array


def standardise_inputs(
    tensors: dict[str, Tensor], statistics: Mapping[str, Standardisation], input_shapes: Mapping[str, Sequence[int]]
) -> dict[str, Tensor]:
    """Each standardised modality transformed with the training statistics, in their precision (as the dataset did)."""
    out = dict(tensors)
    for m, fitted in statistics.items():
        mean, std = torch.as_tensor(fitted.mean), torch.as_tensor(fitted.std)
        sample = (1, *input_shapes[m])
        try:
            fits = torch.broadcast_shapes(mean.shape, std.shape, sample) == sample
        except RuntimeError:
            fits = False
        if not fits or not mean.is_floating_point() or m not in out:
            raise MMBalanceError(
                f"the run's standardisation statistics for '{m}' (shape {tuple(mean.shape)}) do not fit its inputs {sample}"
            )
        x = out[m]
        out[m] = ((x.to(mean.dtype) - mean) / std).to(x.dtype)
    return out


@torch.no_grad()
def predict(method, model, tensors: dict[str, Tensor], modalities: list[str], num_classes: int, device,
            batch_size: int = 256, class_names: list[str] | None = None) -> Predictions:
    """The run's probabilities and modality-only predictions, batch by batch; train mode is left as found."""
    modes = (model.training, method.training)
    model.eval()
    method.eval()
    probabilities, only = [], []
    try:
        count = int(next(iter(tensors.values())).shape[0])
        for start in range(0, count, batch_size):
            chunk = {m: x[start : start + batch_size].to(device) for m, x in tensors.items()}
            features = method.encode(model, chunk)
            probabilities.append(method.predict_from_features(model, features).float().softmax(-1).cpu())
            only.append(zeroed_logits(lambda f: method.fuse(model, f), features, modalities).argmax(-1).cpu())
    finally:
        model.train(modes[0])
        method.train(modes[1])
    if not probabilities:
        return Predictions(torch.zeros(0, num_classes), {m: torch.zeros(0, dtype=torch.long) for m in modalities}, class_names)
    per_modality = torch.cat(only, dim=1)
    return Predictions(torch.cat(probabilities), dict(zip(modalities, per_modality)), class_names)


def read_input_file(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(modality arrays, labels or None) of an npz file in the ``npz`` dataset's layout; ``split`` is ignored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    arrays = read_npz(path)
    inputs = {name: array for name, array in arrays.items() if name not in RESERVED}
    labels = None
    if "label" in arrays:
        labels = integer_labels(arrays["label"], path)
        counts = {int(a.shape[0]) for a in inputs.values() if a.ndim}
        if len(counts) == 1 and counts != {len(labels)}:
            raise DataError(f"'label' in {path} has {len(labels)} entries but the modality arrays have {counts.pop()} samples")
    return inputs, labels
