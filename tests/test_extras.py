"""Optional packages: a small core install, and one line naming the extra when one is missing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmbalance.cli import main
from mmbalance.extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
TINY = ["synthetic.num_samples=200", "synthetic.num_classes=4", "synthetic.strong_groups=2", "synthetic.dims=[8,8]",
        "train.epochs=2", "train.batch_size=32", "model.feature_dim=8", "model.hidden_dim=16"]
SETS = [word for setting in TINY for word in ("--set", setting)]
OPTIONAL = ("soundfile", "sklearn", "h5py", "optuna", "wandb", "mlflow")


def pyproject_extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def package_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_require_returns_the_module_or_names_the_install(monkeypatch):
    assert require("json", extra="x", feature="y") is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    with pytest.raises(MissingExtraError) as error:
        require("sklearn.cluster", extra="avdigits", feature="avdigits")
    assert str(error.value) == "avdigits needs scikit-learn, which is not installed: pip install 'mmbalance[avdigits]'"


# (the module made missing, the command, the extra its error names, the package that extra must install)
CASES = [
    ("sklearn", ["train", "--dataset", "avdigits", "--set", "data.root={tmp}/fsdd"], "avdigits", "scikit-learn"),
    ("soundfile", ["train", "--dataset", "avdigits", "--set", "data.root={tmp}/fsdd"], "avdigits", "soundfile"),
    ("h5py", ["train", "--dataset", "mnist_hog", "--set", "data.root={tmp}/hog"], "mnist-hog", "h5py"),
    ("sklearn", ["train", "--method", "relearning", "--set", "relearning.kmeans_backend=sklearn", *SETS], "sklearn",
     "scikit-learn"),
    ("optuna", ["tune", "--method", "midas", "--trials", "2", *SETS], "tune", "optuna"),
    ("wandb", ["train", "--set", "log.backends=[wandb]", *SETS], "wandb", "wandb"),
    ("mlflow", ["train", "--set", "log.backends=[mlflow]", *SETS], "mlflow", "mlflow"),
]


@pytest.mark.parametrize("module, args, extra, package", CASES, ids=[f"{c[2]}-{c[0]}" for c in CASES])
def test_a_missing_extra_is_one_line_that_names_it_and_writes_nothing(tmp_path, capsys, monkeypatch, module, args,
                                                                       extra, package):
    monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "out"
    code = main(["--quiet", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].endswith(f"needs {package}, which is not installed: pip install 'mmbalance[{extra}]'"), err[0]
    assert not out.exists()
    assert package in package_names(pyproject_extras()[extra])


def test_wav_decoding_without_soundfile_names_the_audio_extra(tmp_path, monkeypatch):
    from mmbalance.data.audio import read_wav
    from mmbalance.data.benchmarks.media import Spectrogram

    (tmp_path / "clip.wav").write_bytes(b"RIFF")  # never read: the decoder is missing
    monkeypatch.setitem(sys.modules, "soundfile", None)
    message = "reading .wav audio needs soundfile, which is not installed: pip install 'mmbalance[audio]'"
    for attempt in (lambda: Spectrogram().probe({"audio": str(tmp_path / "clip")}),
                    lambda: Spectrogram()({"audio": str(tmp_path / "clip")}),
                    lambda: read_wav(tmp_path / "clip.wav")):
        with pytest.raises(MissingExtraError) as error:
            attempt()
        assert str(error.value) == message
    assert "soundfile" in package_names(pyproject_extras()["audio"])


def test_the_core_install_asks_for_no_extra_and_make_installs_every_one_the_tests_use():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = package_names(project["dependencies"])
    assert not core & {"soundfile", "scikit-learn", "h5py", "optuna", "wandb", "mlflow"}
    makefile = (ROOT / "Makefile").read_text()
    installed = set(re.search(r"^EXTRAS := (.+)$", makefile, re.M).group(1).split(","))
    assert installed == set(project["optional-dependencies"]) - {"wandb", "mlflow"}  # those two are faked in tests
    for extra in project["optional-dependencies"]:  # metadata holds normalised names; an older pip matches only those
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", extra), extra


def test_import_mmbalance_imports_no_optional_package():
    probe = f"import sys, mmbalance; print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"
