"""Progress display: a bar on a terminal, silence in logs and with --quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, quiet: bool, enabled_rank: bool = True):
        self.show = (not quiet) and enabled_rank and sys.stderr.isatty()

    def epoch_bar(self, loader, epoch: int, epochs: int, label: str = "epoch"):
        return tqdm(loader, desc=f"{label} {epoch + 1}/{epochs}", leave=False, disable=not self.show, dynamic_ncols=True)

    def set_postfix(self, bar, **values) -> None:
        if self.show:
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)

    def epoch_summary(self, text: str) -> None:
        if self.show:
            tqdm.write(text, file=sys.stderr)
