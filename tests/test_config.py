import pytest

from mmbalance.config import RunConfig, build_config, parse_override
from mmbalance.errors import ConfigError, UnknownNameError


def test_defaults_and_overrides_resolve_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  lr: 0.5\n  epochs: 3\nmethod: unimodal\n")
    config = build_config(file, ["train.lr=0.01", "data.views=[strong,weak]"], seed=7)
    assert config.train.lr == 0.01  # --set beats the file
    assert config.train.epochs == 3  # the file beats the defaults
    assert config.method == "unimodal" and config.seed == 7
    assert config.data.views == ["strong", "weak"]


def test_dataset_defaults_sit_below_the_user():
    config = build_config(dataset="mfeat")
    assert config.train.epochs == 40
    assert build_config(dataset="mfeat", overrides=["train.epochs=2"]).train.epochs == 2


def test_method_and_dataset_sections_are_typed():
    config = build_config(overrides=["joint.unimodal_weight=0.5", "synthetic.num_classes=4", "synthetic.strong_groups=2"])
    assert config.method_config.unimodal_weight == 0.5
    assert config.dataset_config.num_classes == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'; did you mean 'train.lr'\?"),
        ("train.lr=abc", r"invalid value for train.lr: 'abc'"),
        ("train.lr=-1", r"invalid value for train.lr: -1 .*greater than 0"),
        ("train.optimizer=adam", r"invalid value for train.optimizer: 'adam' .*'sgd' or 'adamw'"),
        ("trian.lr=1", r"unknown config section 'trian'; did you mean 'train'\?"),
        ("joint.weight=1", r"unknown config key 'joint.weight'"),
        ("seed=abc", r"invalid value for seed: 'abc'"),
        ("train.lr", r"expected section.key=value"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[override])


def test_unknown_method_suggests_closest():
    with pytest.raises(UnknownNameError, match=r"unknown method 'jiont'; did you mean 'joint'\?"):
        build_config(method="jiont")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(bad)


def test_round_trip_through_yaml():
    config = build_config(overrides=["train.lr=0.02", "model.fusion=gated"], seed=3)
    again = RunConfig(__import__("yaml").safe_load(config.to_yaml()))
    assert again.to_dict() == config.to_dict()


def test_parse_override_reads_yaml_values():
    assert parse_override("data.views=[fac,mor]") == ("data.views", ["fac", "mor"])
    assert parse_override("train.epochs=5") == ("train.epochs", 5)
    assert parse_override("model.fusion=film") == ("model.fusion", "film")
