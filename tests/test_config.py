import pytest

from mmbalance.config import RunConfig, build_config, parse_override
from mmbalance.errors import ConfigError, MMBalanceError, UnknownNameError


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
    assert config.section("joint").unimodal_weight == 0.5
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


def test_method_spec_options_parts_and_recommendations():
    config = build_config(method="midas[lam=0.5,modulation_starts=0]+arl", overrides=["arl.temperature=4"])
    assert config.method == "midas+arl" and config.parts == ["midas", "arl"]
    assert config.section("midas").lam == 0.5 and config.section("midas").modulation_starts == 0
    assert config.section("arl").temperature == 4
    # ARL recommends its spec's gradient clipping; the resolved value is in config.yaml with its source
    assert config.train.grad_clip == 40.0
    assert "# train.grad_clip: recommended by arl" in config.to_yaml()
    assert build_config(method="arl", overrides=["train.grad_clip=0"]).train.grad_clip == 0  # the user wins
    assert build_config(method="joint").train.grad_clip == 0
    plugin_only = build_config(method="arl")
    assert plugin_only.method == "joint+arl"  # plugins alone run on the default objective
    # --set beats a spec option
    assert build_config(method="midas[lam=0.5]", overrides=["midas.lam=2"]).section("midas").lam == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("midas+cal", r"two objectives, 'midas' and 'cal'"),
        ("cal+cal_accel", r"cannot combine 'cal' and 'cal_accel': both do contribution acceleration"),
        ("unimodal+_predicts", r"cannot combine 'unimodal' and '_predicts': both override the prediction"),
        ("_manual+_manual_too", r"cannot combine '_manual' and '_manual_too': both drive the optimizer"),
        ("midas[lam=1", r"unbalanced"),
        ("arl+arl", r"names 'arl' twice"),
        ("mdias", r"unknown method 'mdias'; did you mean 'midas'"),
    ],
)
def test_impossible_compositions_are_refused_naming_both_parts(spec, message, register_part):
    from mmbalance.methods.base import Objective, Plugin

    @register_part("_predicts")
    class Predicts(Plugin):
        """A plugin with its own prediction."""

        def predict_from_features(self, model, features):
            return model.fuse(features)

    @register_part("_manual")
    class Manual(Plugin):
        """A plugin that steps the optimizer itself."""

        manual_optimization = True

    @register_part("_manual_too")
    class ManualToo(Plugin):
        """A plugin with its own optimizers."""

        def configure_optimizers(self, model, ctx):
            return None

    with pytest.raises(MMBalanceError, match=message):
        build_config(method=spec)
