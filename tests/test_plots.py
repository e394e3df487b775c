"""Figures: every one written as PNG and PDF, axes in words, accuracy in %, chance and best-epoch lines,
error bars only over several seeds, legends that cover no data."""

import json

import pytest
import yaml
from matplotlib.container import ErrorbarContainer

from mmbalance.evaluation.figures import REFERENCE, covers_data, known_num_classes, place_legend, pyplot
from mmbalance.evaluation.labels import is_accuracy, readable
from mmbalance.evaluation.plots import RunHistory, plot_run, run_figures
from mmbalance.experiments.bench import write_reports
from mmbalance.experiments.robustness import plot_target, target_figure
from mmbalance.experiments.summary import bar_chart, bar_figure

MODALITIES = ["strong", "weak"]


@pytest.fixture(autouse=True)
def close_figures():
    """Figures drawn but not saved stay open in pyplot; each test closes what it drew."""
    yield
    pyplot().close("all")


def write_run(folder, best_epoch=2, num_classes=4, finished=True):
    """A run folder as the trainer leaves it (four epochs), without training anything."""
    folder.mkdir(parents=True)
    records = [{
        "epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.1 * e,
        "method": {"loss/fused": 1.0 / e, "midas/alpha/strong": 1.0, "midas/alpha/weak": 1.0 + 0.1 * e,
                   "dgl/unimodal_accuracy/strong": 0.05 * e, "dgl/unimodal_accuracy/weak": 0.04 * e},
        "val": {"accuracy": 0.2 + 0.1 * e, "modality_accuracy": {"strong": 0.15 * e, "weak": 0.3}},
    } for e in range(1, 5)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"method": "midas", "seed": 0, "data": {"name": "synthetic"}, "synthetic": {"num_classes": num_classes}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        metrics = {"method": "midas", "dataset": "synthetic", "seed": 0, "best_epoch": best_epoch}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def reference_lines(ax, label_start):
    return [line for line in ax.lines if line.get_gid() == REFERENCE and line.get_label().startswith(label_start)]


def errorbars(ax):
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def assert_png_and_pdf(paths):
    for png in [p for p in paths if p.suffix == ".png"]:
        pdf = png.with_suffix(".pdf")
        assert pdf in paths
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000


def test_keys_read_as_words():
    assert readable("val/accuracy") == "validation accuracy (%)"
    assert readable("midas/alpha") == "α (weak-modality weight)"
    assert readable("loss/fused") == "fused loss"
    assert readable("loss/misaligned") == "misaligned loss"
    assert readable("pmr/relative_score") == "PMR relative score"
    assert readable("ogm_ge/coefficient") == "OGM-GE coefficient"
    assert readable("mmpareto/weight_mm") == "MMPareto weight mm"
    assert readable("dgl/unimodal_accuracy") == "DGL unimodal accuracy (%)"
    assert readable("midas/warmup") == "MIDAS warmup"
    assert is_accuracy("dgl/unimodal_accuracy") and not is_accuracy("midas/alpha")


def test_the_number_of_classes_comes_from_metrics_or_the_datasets_option():
    config = {"data": {"name": "synthetic"}, "synthetic": {"num_classes": 7}}
    assert known_num_classes({"num_classes": 3}, config) == 3
    assert known_num_classes({}, config) == 7
    assert known_num_classes(None, {"data": {"name": "npz"}, "npz": {"num_classes": None}}) is None
    assert known_num_classes(None, None) is None


def test_run_curves_are_written_as_png_and_pdf(tmp_path):
    run = write_run(tmp_path / "run")
    written = plot_run(run)
    names = {p.name for p in written}
    assert {"accuracy.png", "accuracy.pdf", "modality_accuracy.png", "midas_alpha.pdf", "loss_fused.pdf"} <= names
    assert all(p.parent == run / "plots" for p in written)
    assert_png_and_pdf(written)


def test_run_curves_mark_the_best_epoch_and_chance_in_percent(tmp_path):
    history = RunHistory.read(write_run(tmp_path / "run", best_epoch=3, num_classes=4))
    figures = dict(run_figures(history))
    for name, fig in figures.items():
        ax = fig.axes[0]
        [best] = reference_lines(ax, "best epoch")
        assert list(best.get_xdata()) == [3, 3], name
        assert not errorbars(ax)
    accuracy = figures["accuracy"].axes[0]
    assert accuracy.get_ylabel() == "accuracy (%)" and accuracy.get_xlabel() == "epoch"
    [chance] = reference_lines(accuracy, "chance")
    assert list(chance.get_ydata()) == [25.0, 25.0]
    validation = next(line for line in accuracy.lines if line.get_label() == "validation")
    assert list(validation.get_ydata()) == pytest.approx([30, 40, 50, 60])  # fractions shown in %
    assert reference_lines(figures["dgl_unimodal_accuracy"].axes[0], "chance")  # a method's accuracy too
    assert figures["midas_alpha"].axes[0].get_ylabel() == "α (weak-modality weight)"
    loss = figures["loss_fused"].axes[0]
    assert loss.get_ylabel() == "fused loss" and not reference_lines(loss, "chance")


def test_an_unfinished_run_has_no_best_epoch_and_unknown_classes_no_chance_line(tmp_path):
    run = write_run(tmp_path / "run", finished=False, num_classes=None)
    accuracy = dict(run_figures(RunHistory.read(run)))["accuracy"].axes[0]
    assert not reference_lines(accuracy, "best epoch") and not reference_lines(accuracy, "chance")


def results_for(methods, seeds):
    return [{
        "method": m, "label": m, "seed": s, "modalities": MODALITIES, "seconds_per_step": 0.01,
        **{split: {"accuracy": 0.5 + 0.05 * k + 0.01 * s, "macro_f1": 0.5, "imbalance_ratio": 1.0,
                   "modality_accuracy": {"strong": 0.4, "weak": 0.3}} for split in ("val", "test")},
    } for k, m in enumerate(methods) for s in range(seeds)]


def test_bench_chart_has_error_bars_only_over_several_seeds(tmp_path):
    one_seed = bar_figure(results_for(["joint", "midas"], 1), num_classes=5).axes[0]
    assert not errorbars(one_seed)
    [chance] = reference_lines(one_seed, "chance")
    assert list(chance.get_ydata()) == [20.0, 20.0]
    assert one_seed.get_ylabel() == "test accuracy (%)"
    assert len(errorbars(bar_figure(results_for(["joint", "midas"], 2)).axes[0])) == 2
    written = bar_chart(results_for(["joint"], 1), tmp_path / "summary.png")
    assert [p.name for p in written] == ["summary.png", "summary.pdf"]
    assert_png_and_pdf(written)


def test_a_long_legend_goes_outside_the_axes():
    methods = ["joint", "unimodal", "midas", "cal", "arl", "pmr"]
    ax = bar_figure(results_for(methods, 1), num_classes=4).axes[0]
    renderer = ax.figure.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    short = bar_figure(results_for(["joint", "midas"], 1)).axes[0]
    legend = short.get_legend()
    assert legend.get_window_extent(renderer).x0 < short.get_window_extent(renderer).x1
    assert not covers_data(short, legend)


def test_a_legend_over_data_is_moved_outside():
    fig, ax = pyplot().subplots()
    for k in range(3):  # lines across the whole axes: no corner inside is free
        ax.plot([0, 1], [k, k], label=f"line {k}")
    ax.plot([0, 1], [2, 0], label="diagonal")
    ax.plot([0, 1], [0, 2], label="other diagonal")
    ax.set_ylim(-0.1, 2.1)
    inside = ax.legend(loc="upper left")
    assert covers_data(ax, inside)
    legend = place_legend(ax, max_inside=10)
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    pyplot().close(fig)


def robustness(runs_per_method, num_classes=10):
    runs = [{"label": label, "method": label, "accuracy": {"weak": [0.9, 0.6 + 0.01 * k, 0.3]}}
            for label in ("joint", "midas") for k in range(runs_per_method)]
    return {"corruption": "gaussian", "levels": [0, 1, 2], "fraction": 0.5, "split": "test",
            "targets": {"weak": ["weak"]}, "num_classes": num_classes, "runs": runs}


def test_robustness_curves_in_percent_with_chance_and_bands_only_over_several_runs(tmp_path):
    ax = target_figure(robustness(1), "weak").axes[0]
    assert ax.get_xlabel() == "corruption level ε" and ax.get_ylabel() == "test accuracy (%)"
    [chance] = reference_lines(ax, "chance")
    assert list(chance.get_ydata()) == [10.0, 10.0]
    assert not ax.collections and not errorbars(ax)  # one run per method: no band
    assert len(target_figure(robustness(2), "weak").axes[0].collections) == 2
    written = plot_target(robustness(1), "weak", tmp_path / "robustness-weak.png")
    assert_png_and_pdf(written)


def test_bench_summary_links_the_robustness_report_once_there_is_one(tmp_path):
    results = results_for(["joint", "midas"], 2)
    write_reports(results, tmp_path, "synthetic", None, num_classes=4)
    summary = (tmp_path / "summary.md").read_text()
    assert "robustness.md" not in summary and "(summary.pdf)" in summary
    assert_png_and_pdf([tmp_path / "summary.png", tmp_path / "summary.pdf"])
    (tmp_path / "robustness").mkdir()
    (tmp_path / "robustness" / "robustness.md").write_text("# Robustness\n")
    write_reports(results, tmp_path, "synthetic", None, num_classes=4)
    assert "[robustness/robustness.md](robustness/robustness.md)" in (tmp_path / "summary.md").read_text()


def test_plot_of_a_real_run_has_pdfs_and_chance_at_one_over_c(tmp_path, tiny_overrides):
    from mmbalance.api import train

    run = train("synthetic", "midas", tmp_path / "run", tiny_overrides)
    assert_png_and_pdf(plot_run(run.path))
    history = RunHistory.read(run.path)
    assert history.num_classes == 4 and history.best_epoch in (1, 2)
    accuracy = dict(run_figures(history))["accuracy"].axes[0]
    [chance] = reference_lines(accuracy, "chance")
    assert list(chance.get_ydata()) == [25.0, 25.0]
