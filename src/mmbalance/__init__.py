"""mmbalance: train multimodal classifiers that use every modality.

``import mmbalance`` registers every built-in method, dataset, encoder,
fusion head, corruption and metric, and gives the Python API::

    run = mmbalance.train(dataset="synthetic", method="midas+arl", out="runs/r",
                          overrides={"train.epochs": 2})
    run.metrics["test"]["accuracy"]
    run = mmbalance.load_run("runs/r"); run.evaluate("val"); run.predict(inputs)
"""

__version__ = "0.1.0"

from . import data, models, methods, evaluation  # noqa: E402,F401  (fill the registries)
from .data import corruptions  # noqa: E402,F401
from .data.base import DataBundle  # noqa: E402
from .api import Run, bench, load_run, train  # noqa: E402
from .extensions import load_extensions  # noqa: E402

__all__ = ["DataBundle", "Run", "bench", "load_extensions", "load_run", "train", "__version__"]
