"""Search spaces: the types refuse nonsense, and every declared range is one its option accepts."""

import pytest

from mmbalance.cli import main
from mmbalance.config import TrainConfig
from mmbalance.errors import ConfigError
from mmbalance.registry import METHODS
from mmbalance.search_space import TRAIN_SPACE, Choice, FloatRange, IntRange, check_space

#: the built-in parts with options worth tuning; each must declare a space
TUNABLE = ("midas", "cal", "arl", "cal_accel", "ogm_ge", "agm", "pmr", "mmpareto", "opm", "relearning", "inforeg",
           "mcr", "mixup", "powmix", "gblending", "umt", "ume", "mmcosine", "mbsd", "cml", "lfm", "dgl", "g2d",
           "g2d_smp", "mla", "reconboost", "smv")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_declared_range_lies_within_its_option(name):
    part = METHODS.get(name)
    space = getattr(part, "search_space", {})
    check_space(name, part.Config, space)  # keys are options; the section accepts every edge
    for key, value in space.items():
        assert key in part.Config.model_fields
        for edge in value.edges():  # the part itself accepts it too (checks made when it is built)
            part(part.Config(**{key: edge}), ["a", "b"], 4)
    if name in TUNABLE:
        assert space, f"{name} declares no search space"


def test_train_space_lies_within_the_trainer_options():
    check_space("train", TrainConfig, TRAIN_SPACE)
    assert set(TRAIN_SPACE) == {"lr", "weight_decay"}


@pytest.mark.parametrize("make, pattern", [
    (lambda: FloatRange(2.0, 1.0), "low < high"),
    (lambda: FloatRange(0.0, 1.0, log=True), "low > 0"),
    (lambda: FloatRange(0.0, float("inf")), "finite"),
    (lambda: IntRange(1, 10, step=4), "divide"),
    (lambda: IntRange(1.0, 3), "integers"),
    (lambda: Choice(["a"]), "at least two"),
    (lambda: Choice(["a", "a"]), "twice"),
    (lambda: Choice([[1], [2]]), "None, booleans, numbers or strings"),
])
def test_range_types_refuse_nonsense(make, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make()


def test_check_space_names_the_part_the_key_and_the_value():
    schema = METHODS.get("midas").Config
    with pytest.raises(ConfigError, match="'midas' names 'lamda', which is not one of its options"):
        check_space("midas", schema, {"lamda": FloatRange(0.1, 1.0)})
    with pytest.raises(ConfigError, match="lets lam be -1.0, which midas.lam refuses"):
        check_space("midas", schema, {"lam": FloatRange(-1.0, 1.0)})
    with pytest.raises(ConfigError, match="lets similarity be 'dot'"):
        check_space("midas", schema, {"similarity": Choice(["cosine", "dot"])})
    with pytest.raises(ConfigError, match="use FloatRange, IntRange or Choice"):
        check_space("midas", schema, {"lam": (0.1, 1.0)})


def test_list_options_shows_type_default_description_and_range(capsys):
    assert main(["list", "options", "midas"]) == 0
    out = capsys.readouterr().out
    lam = next(line for line in out.splitlines() if line.strip().startswith("lam "))
    assert "float (>= 0)" in lam and "default 1.0" in lam and "tune [0.1, 4] log" in lam
    assert "weight λ of the misaligned loss" in out
    assert "similarity" in out and "tune {cosine, l2}" in out
    assert main(["list", "options", "train"]) == 0
    assert "tune [0.0001, 0.1] log" in capsys.readouterr().out


@pytest.mark.parametrize("args, pattern", [
    (["list", "options"], "list options needs a NAME"),
    (["list", "options", "mida"], "did you mean 'midas'"),
    (["list", "methods", "midas"], "list methods takes no name"),
])
def test_list_options_errors_are_one_line(args, pattern, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0]
