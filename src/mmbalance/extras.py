"""Optional packages: imported where they are used, and one line naming the install when one is missing.

The core install (torch, numpy, pydantic, PyYAML, tqdm, matplotlib, pillow)
trains and evaluates every method on vector data. A package that only one
dataset or feature needs is an extra of ``pyproject.toml`` (``audio``,
``avdigits``, ``mnist-hog``, ``sklearn``, ``tune``, ``wandb``, ``mlflow``;
names in normalised form, lowercase and hyphens, which every pip matches),
and ``import mmbalance`` never imports it: the code that needs it calls
``require`` at the point of use, so a missing one is a one-line error that
says which ``pip install 'mmbalance[EXTRA]'`` fixes it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError

#: import name -> the name pip installs it by, where the two differ
PIP_NAMES = {"sklearn": "scikit-learn"}


class MissingExtraError(ConfigError):
    """An optional package is missing for something the configuration or command chose (a dataset, a backend, tuning)."""


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """``module`` imported, or ``MissingExtraError``: '<feature> needs <package>, which is not installed: pip install ...'.

    ``feature`` is what the user asked for, in their words (``avdigits``,
    ``log.backends=[wandb]``); ``extra`` is the extra of pyproject.toml that
    installs ``module``.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        package = PIP_NAMES.get(top, top)
        raise MissingExtraError(
            f"{feature} needs {package}, which is not installed: pip install 'mmbalance[{extra}]'"
        ) from None
