"""``mmbalance predict`` and ``Run.predict``: raw inputs get the run's own predictions, bad inputs one line."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import mmbalance
from mmbalance.cli import main
from mmbalance.prediction import Predictions

SAMPLES = 200
CLASSES = 4
TINY = ["train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16", "train.lr=0.01"]


def raw_arrays() -> dict[str, np.ndarray]:
    """Features far from zero mean and unit spread (so standardisation matters), and token ids."""
    rng = np.random.default_rng(0)
    label = np.arange(SAMPLES) % CLASSES
    audio = 50 + 10 * rng.standard_normal((SAMPLES, 8)) + 8 * np.eye(CLASSES)[label].repeat(2, axis=1)
    video = rng.standard_normal((SAMPLES, 2, 3)) * np.array([1.0, 100.0])[None, :, None] - 20 + 3 * (label % 2)[:, None, None]
    tokens = rng.integers(0, 10, (SAMPLES, 5))
    return {"audio": audio.astype(np.float32), "video": video.astype(np.float32), "tokens": tokens, "label": label}


def cli(*args) -> int:
    return main(["--quiet", *args])


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    data = folder / "data.npz"
    np.savez(data, **raw_arrays())
    settings = [arg for key in TINY for arg in ("--set", key)]
    assert cli("train", "--dataset", "npz", "--set", f"data.path={data}", "--out", str(folder / "run"), *settings) == 0
    return folder


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def one_line_error(capsys, code, pattern):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


def test_predicting_the_training_file_gives_the_runs_own_predictions(npz_run, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert cli("predict", "--run", str(npz_run / "run"), "--input", str(npz_run / "data.npz"), "--out", str(out)) == 0
    assert f"{SAMPLES} predictions written to {out}; accuracy" in capsys.readouterr().out
    rows = read_csv(out)
    assert len(rows) == SAMPLES and [int(r["index"]) for r in rows] == list(range(SAMPLES))
    assert list(rows[0]) == ["index", "label", "predicted", *(f"probability_{k}" for k in range(CLASSES)),
                             "audio_only", "video_only", "tokens_only"]
    probabilities = torch.tensor([[float(r[f"probability_{k}"]) for k in range(CLASSES)] for r in rows])
    assert torch.allclose(probabilities.sum(1), torch.ones(SAMPLES), atol=1e-6)

    # the run's predictions on its own (standardised) data, as evaluation computes them
    run = mmbalance.load_run(npz_run / "run")
    trainer = run.trainer
    assert trainer.bundle.info["standardized"] == ["audio", "video"]
    for split in ("train", "test"):
        part = trainer.bundle.split(split)
        with torch.no_grad():
            trainer.model.eval()
            expected = trainer.method.predict(trainer.model, part.inputs).softmax(-1)
        rows_of_split = part.index.tolist()
        assert torch.allclose(probabilities[rows_of_split], expected, atol=1e-5)
        predicted = torch.tensor([int(rows[i]["predicted"]) for i in rows_of_split])
        assert torch.equal(predicted, expected.argmax(1))
        accuracy = float((predicted == part.labels).double().mean())
        assert accuracy == pytest.approx(run.evaluate(split)["accuracy"])
    # modality-only columns: the modality-only accuracy of metrics.json
    test_rows = trainer.bundle.test.index.tolist()
    for m, recorded in run.metrics["test"]["modality_accuracy"].items():
        only = torch.tensor([int(rows[i][f"{m}_only"]) for i in test_rows])
        assert float((only == trainer.bundle.test.labels).double().mean()) == pytest.approx(recorded)


def test_training_statistics_are_stored_in_best_pt_and_applied(npz_run):
    arrays = raw_arrays()
    stored = torch.load(npz_run / "run" / "best.pt", weights_only=True)["standardisation"]
    assert sorted(stored) == ["audio", "video"]  # token ids are never standardised
    run = mmbalance.load_run(npz_run / "run")
    train_rows = run.trainer.bundle.train.index.numpy()
    audio = torch.from_numpy(arrays["audio"][train_rows]).double()
    assert stored["audio"]["mean"].dtype == torch.float64
    assert torch.allclose(stored["audio"]["mean"], audio.mean(0, keepdim=True))
    assert torch.allclose(stored["audio"]["std"], audio.std(0, correction=0, keepdim=True))
    assert stored["video"]["mean"].shape == (1, 2, 1)  # one mean per channel of (C, L)

    inputs = {m: arrays[m] for m in ("audio", "video", "tokens")}
    predictions = run.predict(inputs)
    assert isinstance(predictions, Predictions) and predictions.probabilities.shape == (SAMPLES, CLASSES)
    assert sorted(predictions.modality_only) == ["audio", "tokens", "video"]
    unscaled = run.predict(inputs, standardize=False)
    assert not torch.allclose(unscaled.probabilities, predictions.probabilities, atol=1e-3)
    # the loaded bundle's tensors are standardised already
    standardised = {m: torch.cat([run.trainer.bundle.split(s).inputs[m] for s in ("train", "val", "test")]) for m in inputs}
    order = torch.cat([run.trainer.bundle.split(s).index for s in ("train", "val", "test")])
    again = run.predict(standardised, standardize=False)
    assert torch.allclose(again.probabilities, predictions.probabilities[order], atol=1e-5)


def test_python_predict_matches_the_csv(npz_run, tmp_path):
    arrays = raw_arrays()
    out = tmp_path / "p.csv"
    assert cli("predict", "--run", str(npz_run / "run"), "--input", str(npz_run / "data.npz"), "--out", str(out),
               "--set", "train.device=cpu", "--set", "train.eval_batch_size=7") == 0
    rows = read_csv(out)
    predictions = mmbalance.load_run(npz_run / "run").predict({m: arrays[m] for m in ("audio", "video", "tokens")})
    assert torch.equal(predictions.classes, torch.tensor([int(r["predicted"]) for r in rows]))
    written = torch.tensor([[float(r[f"probability_{k}"]) for k in range(CLASSES)] for r in rows])
    assert torch.allclose(written, predictions.probabilities, atol=1e-6)
    for m in ("audio", "video", "tokens"):
        assert predictions.modality_only[m].tolist() == [int(r[f"{m}_only"]) for r in rows]
    scores = predictions.accuracy(arrays["label"])
    assert scores["accuracy"] == pytest.approx(float((predictions.classes.numpy() == arrays["label"]).mean()))


def test_a_run_without_stored_statistics_recomputes_them_from_its_data(npz_run, tmp_path):
    import shutil

    copy = tmp_path / "old-run"
    shutil.copytree(npz_run / "run", copy)
    checkpoint = torch.load(copy / "best.pt", weights_only=True)
    del checkpoint["standardisation"]
    torch.save(checkpoint, copy / "best.pt")
    inputs = {m: raw_arrays()[m] for m in ("audio", "video", "tokens")}
    old = mmbalance.load_run(copy).predict(inputs)
    assert torch.allclose(old.probabilities, mmbalance.load_run(npz_run / "run").predict(inputs).probabilities, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("video"), "modality 'video' is missing: the run expects (N, 2, 3) float features"),
        (lambda a: a.update(depth=a["audio"]), "'depth' is not a modality of the run, which reads audio (N, 8) float features"),
        (lambda a: a.update(audio=a["audio"][:, :7]), "modality 'audio' has samples of shape (7,); the run expects (N, 8) float features"),
        (lambda a: a.update(tokens=a["tokens"].astype(np.float64)), "modality 'tokens' holds float64 values; the run expects (N, 5) integer token ids"),
        (lambda a: a.update(audio=a["audio"].astype(np.int64)), "modality 'audio' holds int64 values; the run expects (N, 8) float features"),
        (lambda a: a.update(video=a["video"][:5]), "every modality needs the same number of samples"),
        (lambda a: a.update(label=a["label"][:5]), "'label' in"),
        (lambda a: a.update(label=a["label"] + 10), "out of range (allowed: 0..3)"),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(npz_run, tmp_path, capsys, change, message):
    arrays = raw_arrays()
    change(arrays)
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    out = tmp_path / "preds.csv"
    code = cli("predict", "--run", str(npz_run / "run"), "--input", str(data), "--out", str(out))
    one_line_error(capsys, code, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_existing_output_is_kept_unless_overwrite(npz_run, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("mine\n")
    args = ["predict", "--run", str(npz_run / "run"), "--input", str(npz_run / "data.npz"), "--out", str(out)]
    one_line_error(capsys, cli(*args), "exists already; pass --overwrite")
    assert out.read_text() == "mine\n"
    # a failure with --overwrite leaves the old file as it was
    one_line_error(capsys, cli(*args, "--overwrite", "--set", "model.feature_dim=4"),
                   "--set model.feature_dim cannot change for a finished run")
    assert out.read_text() == "mine\n"
    one_line_error(capsys, cli(*args[:4], str(tmp_path / "none.npz"), "--out", str(tmp_path / "x.csv")), "input file not found")
    assert cli(*args, "--overwrite") == 0
    assert len(read_csv(out)) == SAMPLES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]  # no temporary file left beside it


def test_in_memory_run_predicts_its_raw_tensors(tmp_path):
    arrays = raw_arrays()
    data = mmbalance.DataBundle.from_tensors({"audio": arrays["audio"], "video": arrays["video"]}, arrays["label"], seed=0)
    trained = mmbalance.train(data=data, out=tmp_path / "run", overrides=TINY)
    run = mmbalance.load_run(tmp_path / "run")
    # trained on the tensors as given: reading data.npz back must not standardise them
    assert run.config.data.standardize is False
    assert run.evaluate("test")["accuracy"] == pytest.approx(trained.metrics["test"]["accuracy"])
    test = data.test
    predictions = run.predict({m: test.inputs[m] for m in ("audio", "video")})
    accuracy = float((predictions.classes == test.labels).double().mean())
    assert accuracy == pytest.approx(trained.metrics["test"]["accuracy"])
    only = predictions.accuracy(test.labels)["modality_accuracy"]
    assert only == pytest.approx(trained.metrics["test"]["modality_accuracy"])


def test_csv_names_classes_when_the_run_knows_them():
    probabilities = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    predictions = Predictions(probabilities, {"a": torch.tensor([1, 2]), "b": torch.tensor([0, 0])}, ["cat", "dog", "eel"])
    lines = predictions.csv_text(labels=np.array([1, 2])).splitlines()
    assert lines[0] == "index,label,predicted,predicted_name,probability_cat,probability_dog,probability_eel,a_only,a_only_name,b_only,b_only_name"
    assert lines[1] == "0,1,1,dog,0.100000001,0.699999988,0.200000003,1,dog,0,cat"
    assert predictions.accuracy([1, 2]) == {"accuracy": 0.5, "modality_accuracy": {"a": 1.0, "b": 0.0}}


def test_predict_refuses_a_multi_label_run_in_one_line(tmp_path):
    import mmbalance
    from mmbalance.errors import MMBalanceError

    tiny = {"synthetic.num_samples": 200, "synthetic.num_classes": 4, "synthetic.strong_groups": 2,
            "synthetic.dims": [8, 8], "synthetic.multi_label": True, "train.epochs": 1}
    run = mmbalance.train(dataset="synthetic", method="joint", out=tmp_path / "ml", overrides=tiny, quiet=True)
    with pytest.raises(MMBalanceError, match="single-label runs only") as error:
        run.predict({m: torch.zeros(2, 8) for m in ("strong", "weak")})
    assert "\n" not in str(error.value)
