"""Progress display: a bar on a terminal; one plain line per epoch in logs (a cluster job, nohup, a pipe); silence with --quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, quiet: bool, enabled_rank: bool = True):
        terminal = sys.stderr.isatty()
        self.show = (not quiet) and enabled_rank and terminal  # the per-step bar
        self.lines = (not quiet) and enabled_rank  # the per-epoch line, on a terminal and in logs alike

    def epoch_bar(self, loader, epoch: int, epochs: int, label: str = "epoch"):
        return tqdm(loader, desc=f"{label} {epoch + 1}/{epochs}", leave=False, disable=not self.show, dynamic_ncols=True)

    def set_postfix(self, bar, **values) -> None:
        if self.show:
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)

    def epoch_summary(self, text: str) -> None:
        if self.show:
            tqdm.write(text, file=sys.stderr)
        elif self.lines:
            print(text, file=sys.stderr, flush=True)
