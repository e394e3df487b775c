"""What a study leaves in its folder: trials.csv, trials.md and search.png (and search.pdf).

They are rebuilt from the study's records (``study.trial_rows``) after every
trial, so a killed study's folder describes the trials it finished, and a
study that several machines share is described whole on each of them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..files import atomic_write_text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_trials_csv(rows: list[dict], keys: list[str], path: Path) -> None:
    """One line per trial: number, state, value (validation accuracy, 0-1), epochs trained, every parameter."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["number", "state", "value", "epochs", *keys, "note"])
    for row in rows:
        writer.writerow([row["number"], row["state"], _cell(row["value"]), row["epochs"],
                         *(_cell(row["params"].get(key)) for key in keys), row["note"]])
    atomic_write_text(path, buffer.getvalue())


def write_trials_markdown(rows: list[dict], keys: list[str], path: Path, title: str, command: str | None,
                          best: dict | None, target: int) -> None:
    counted = [r for r in rows if r["state"] in ("complete", "pruned")]
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    states = {state: sum(r["state"] == state for r in rows) for state in ("complete", "pruned", "fail", "running")}
    done = f"{len(counted)} of {target} trials done" if len(counted) < target else f"{len(counted)} trials done"
    lines.append(
        f"{done} ({states['complete']} complete, {states['pruned']} pruned"
        + (f"; {states['fail']} failed or interrupted, not counted" if states["fail"] else "")
        + (f"; {states['running']} running" if states["running"] else "") + ")."
        " Value: the best validation accuracy over the trial's epochs (%); pruned trials show the best"
        " they reached before the pruner stopped them."
    )
    lines.append("")
    if best is not None:
        shown = ", ".join(f"{k}={_cell(v)}" for k, v in best["params"].items())
        lines += [f"Best: trial {best['number']}, {100 * best['value']:.2f}% ({shown}); its config is best.yaml.", ""]
    header = ["trial", "state", "value", "epochs", *keys]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        value = row["value"] if row["value"] is not None else row["reached"]
        shown = "" if value is None else f"{100 * value:.2f}"
        if row["state"] == "pruned" and shown:
            shown = f"({shown})"
        if best is not None and row["number"] == best["number"]:
            shown = f"**{shown}**"
        state = row["state"] + (f" ({row['note']})" if row["note"] else "")
        cells = [str(row["number"]), state, shown, str(row["epochs"]), *(_cell(row["params"].get(k)) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_search(rows: list[dict], path: Path, title: str) -> None:
    """Each trial's value (pruned ones at the best they reached), and the best so far."""
    from ..evaluation.figures import place_legend, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["reached"] is not None]
    ax.plot([r["number"] for r in done], [100 * r["value"] for r in done], "o", color="tab:blue", label="complete")
    if pruned:
        ax.plot([r["number"] for r in pruned], [100 * r["reached"] for r in pruned], "x", color="tab:gray",
                label="pruned (best epoch reached)")
    best, xs, ys = None, [], []
    for r in sorted(rows, key=lambda r: r["number"]):  # the best complete trial so far, drawn to the last trial
        if r["state"] == "complete":
            best = r["value"] if best is None else max(best, r["value"])
        if best is not None:
            xs.append(r["number"])
            ys.append(100 * best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_legend(ax)
    save_figure(fig, path)  # PNG and its PDF twin
