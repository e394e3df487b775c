"""The linear reference of a bench: multinomial logistic regression on all features at once.

On vector features a regularised linear classifier is a strong, cheap
baseline, and a balancing method that cannot beat it has not shown much. It
sees what the deep models see (every modality, the same split of each seed),
standardised with training statistics; its L2 strength is chosen on the
validation split from a small grid and test is read once, for the chosen
model. Full-batch L-BFGS in float64 on the CPU, from zero weights for the
strongest L2 and from the previous solution for each weaker one: no random
state, so a seed's result is the same every time. Inputs that are not float
vectors (images, spectrograms, token ids) are refused: a linear model on
pixels answers another question.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.base import DataBundle
from ..data.loading import load_dataset
from ..data.standardise import standardise
from ..errors import ConfigError
from ..evaluation.metrics import macro_f1
from .comparison import compare, format_p, label_of, points
from .summary import mean_std

NAME = "linear"
#: L2 strengths tried, weakest first (the penalty is l2 / 2 · ||W||² on top of the mean cross-entropy)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MAX_ITERATIONS = 500


def is_linear(spec: str) -> bool:
    return spec.strip() == NAME or spec.strip().startswith(f"{NAME}[")


def split_reference(methods: list[str]) -> tuple[list[str], bool]:
    """(the methods to train, whether the linear reference was asked for) from a bench's ``--methods``."""
    linear = [m for m in methods if is_linear(m)]
    if any(m.strip() != NAME for m in linear):
        raise ConfigError(f"the linear reference takes no options; write '{NAME}' (its L2 grid: {', '.join(map(str, L2_GRID))})")
    if len(linear) > 1:
        raise ConfigError(f"--methods lists '{NAME}' twice; each method once")
    trained = [m for m in methods if not is_linear(m)]
    if linear and not trained:
        raise ConfigError(f"--methods has only the linear reference; add the methods to compare with it, e.g. joint,{NAME}")
    return trained, bool(linear)


def vector_features(bundle: DataBundle) -> None:
    """Refuse, with one line, data that is not one float vector per sample and modality (nor multi-label)."""
    if getattr(bundle, "task", "single_label") == "multi_label":
        raise ConfigError(
            f"the linear reference is a softmax regression for one class per sample; leave '{NAME}' out of "
            "--methods for multi-label data"
        )
    for m in bundle.modalities:
        shape, dtype = tuple(bundle.input_shapes[m]), bundle.input_dtypes.get(m, torch.float32)
        if len(shape) != 1 or not dtype.is_floating_point:
            kind = "token ids" if not dtype.is_floating_point else f"samples of shape {shape}"
            raise ConfigError(
                f"the linear reference needs float vector features, but modality '{m}' has {kind}; "
                f"leave '{NAME}' out of --methods for this dataset"
            )


def features(bundle: DataBundle, split: str) -> torch.Tensor:
    data = bundle.split(split)
    return torch.cat([data.inputs[m].double() for m in bundle.modalities], dim=1)


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, start=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and biases minimising mean cross-entropy + l2 / 2 · ||W||² (the bias is not penalised).

    ``start``: the (weights, biases) to begin from (the solution for a stronger
    L2, which is close); zeros otherwise.
    """
    if start is None:
        start = (torch.zeros(x.shape[1], num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64))
    weight, bias = (t.clone().requires_grad_(True) for t in start)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITERATIONS, tolerance_grad=1e-7,
                                  tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def scores(x: torch.Tensor, y: torch.Tensor, model: tuple[torch.Tensor, torch.Tensor], num_classes: int) -> dict:
    predictions = (x @ model[0] + model[1]).argmax(dim=1)
    return {"accuracy": float((predictions == y).double().mean()), "macro_f1": macro_f1(predictions, y, num_classes)}


def linear_reference(bundle: DataBundle, grid: tuple[float, ...] = L2_GRID) -> dict:
    """Fit on train for each L2 strength, keep the best on validation, report it on validation and test.

    Ties in validation accuracy go to the stronger regularisation (the simpler model).
    """
    vector_features(bundle)
    with torch.no_grad():
        x = {s: features(bundle, s) for s in ("train", "val", "test")}
        train_rows = torch.arange(x["train"].shape[0])
        joined = standardise(torch.cat([x["train"], x["val"], x["test"]]), train_rows)
        x = dict(zip(x, joined.split([len(v) for v in x.values()])))
    y = {s: bundle.split(s).labels for s in x}
    models: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    start = None
    with torch.enable_grad():
        for l2 in sorted(grid, reverse=True):  # strongest first, each fit starting from the previous solution
            models[l2] = start = fit(x["train"], y["train"], bundle.num_classes, l2, start)
    val = {l2: scores(x["val"], y["val"], model, bundle.num_classes) for l2, model in models.items()}
    chosen = max(grid, key=lambda l2: (val[l2]["accuracy"], l2))
    return {
        "val": val[chosen],
        "test": scores(x["test"], y["test"], models[chosen], bundle.num_classes),
        "linear": {"l2": chosen, "val_accuracy": {str(l2): val[l2]["accuracy"] for l2 in grid}},
    }


def reference_results(configs: list, log=lambda text: None) -> list[dict]:
    """The linear reference for each seed's config, as bench results (one per seed, labelled ``linear``)."""
    results = []
    for config in configs:
        bundle = load_dataset(config)
        result = linear_reference(bundle)
        results.append({
            "method": NAME, "label": NAME, "reference": True, "dataset": config.data.name, "seed": config.seed,
            "modalities": list(bundle.modalities), **result, "dataset_info": bundle.info,
        })
        log(f"{NAME} reference, seed {config.seed}: test accuracy {100 * result['test']['accuracy']:.2f}% "
            f"(L2 {result['linear']['l2']:g}, chosen on validation)")
    return results


def beaten_lines(results: list[dict], test: str = "t") -> list[str]:
    """A plain sentence naming the methods whose mean test accuracy is below the linear reference's."""
    accuracy: dict[str, list[float]] = {}
    for r in results:
        accuracy.setdefault(label_of(r), []).append(r["test"]["accuracy"])
    if NAME not in accuracy:
        return []
    reference = mean_std(accuracy[NAME])[0]
    below = [label for label, values in accuracy.items() if mean_std(values)[0] < reference]
    if not below:
        return []
    comparisons = compare(results, NAME, test)

    def gap(label: str) -> str:
        p = comparisons[label].p
        return f"`{label}` (by {points(reference - mean_std(accuracy[label])[0]).lstrip('+')} points" + (
            f", {format_p(p)} paired by seed)" if p is not None else ")"
        )

    return [
        "The linear reference (logistic regression on the standardised features of every modality, L2 chosen "
        f"on validation) is more accurate on test than {', '.join(gap(label) for label in below)}: on this data, "
        "these models do not beat a linear classifier.",
        "",
    ]
