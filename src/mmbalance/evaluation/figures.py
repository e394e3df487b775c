"""What every figure mmbalance draws has in common, so that each can go into a paper as it is.

Each figure is written twice, as PNG (reports, READMEs) and as PDF (vector,
TrueType fonts, for print), both atomically. Accuracies are in %, with a
chance line at 100/C where the number of classes C is known; reference lines
(chance, best epoch) carry ``gid="reference"`` so that tests and the legend
check tell them from data. A legend never covers data: beyond
``MAX_LEGEND_INSIDE`` entries, or where matplotlib's best place still covers
a curve, a bar or a label, it goes outside the axes, on the right. Only the
Agg backend is used: no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes

#: the formats every figure is written in, the first one named by the caller's path
FORMATS = ("png", "pdf")
DPI = 150
#: a legend with more entries than this goes outside the axes
MAX_LEGEND_INSIDE = 4
REFERENCE = "reference"


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> list[Path]:
    """Write ``fig`` as ``path`` in every format of ``FORMATS`` (same name, own suffix); closes it."""
    import matplotlib

    plt = pyplot()
    written = []
    try:
        # TrueType fonts in the PDF: Type 3 fonts are refused by some publishers' checks
        with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
            for suffix in FORMATS:
                target = Path(path).with_suffix(f".{suffix}")
                atomic_write_bytes(
                    target, lambda handle, suffix=suffix: fig.savefig(handle, format=suffix, dpi=DPI, bbox_inches="tight")
                )
                written.append(target)
    finally:
        plt.close(fig)
    return written


def chance_line(ax, num_classes: int | None) -> None:
    """A dotted line at 100/C % on an accuracy axis; nothing when C is unknown."""
    if num_classes:
        ax.axhline(100 / num_classes, color="0.45", linestyle=":", linewidth=1,
                   label=f"chance (1/{num_classes})", gid=REFERENCE, zorder=1)


def best_epoch_line(ax, best_epoch: int | None) -> None:
    """A dashed vertical line at the epoch whose checkpoint the run kept (best.pt)."""
    if best_epoch is not None and best_epoch >= 1:
        ax.axvline(best_epoch, color="0.3", linestyle="--", linewidth=1,
                   label=f"best epoch ({best_epoch})", gid=REFERENCE, zorder=1)


def is_reference(artist) -> bool:
    return artist.get_gid() == REFERENCE


def place_legend(ax, max_inside: int = MAX_LEGEND_INSIDE, **options):
    """A legend inside at matplotlib's best place when small and covering no data, else outside on the right."""
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return None
    options.setdefault("fontsize", 8)
    if len(handles) <= max_inside:
        legend = ax.legend(loc="best", **options)
        if not covers_data(ax, legend):
            return legend
        legend.remove()
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **options)


def covers_data(ax, legend) -> bool:
    """Whether the legend's box meets a data curve, band, bar or label (reference lines may pass under it)."""
    from matplotlib.collections import PathCollection

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    for line in ax.lines:
        if is_reference(line) or not line.get_visible() or len(line.get_xydata()) == 0:
            continue
        path = line.get_transform().transform_path(line.get_path())
        if path.intersects_bbox(box, filled=False):
            return True
    for collection in ax.collections:
        if isinstance(collection, PathCollection):  # markers placed at points (scatter): the points are the data
            points = collection.get_offset_transform().transform(collection.get_offsets())
            if any(box.contains(x, y) for x, y in points):
                return True
            continue
        transform = collection.get_transform()
        if any(transform.transform_path(p).intersects_bbox(box) for p in collection.get_paths()):
            return True
    for artist in [*ax.patches, *ax.texts]:
        if artist.get_visible() and artist.get_window_extent(renderer).overlaps(box):
            return True
    return False


def known_num_classes(metrics: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> int | None:
    """C, the number of classes, where a run says it: its metrics, else its dataset's ``num_classes`` option.

    None when neither does (an ``npz`` dataset that infers C from its labels
    and metrics written without it): the figure then has no chance line.
    """
    value = (metrics or {}).get("num_classes")
    if value is None and config:
        dataset = (config.get("data") or {}).get("name")
        section = config.get(dataset) if isinstance(dataset, str) else None
        value = section.get("num_classes") if isinstance(section, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else None
