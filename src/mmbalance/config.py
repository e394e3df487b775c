"""Typed, validated run configuration.

A run is configured by layers, each overriding the one before: the defaults
below, the dataset's recommended settings, a YAML file, and ``--set
section.key=value`` flags. The core sections are ``train``, ``data`` and
``model``; every registered method and dataset owns a section named after
itself (``midas.level``, ``synthetic.num_classes``), validated by that
component's own ``Config`` class. Unknown keys and bad values are rejected
with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .registry import DATASETS, METHODS, closest


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False,
        strict=True,  # no booleans for numbers, no strings for numbers: a value is what it says
        allow_inf_nan=False,  # no inf or nan anywhere (train.lr=.inf)
    )


class TrainConfig(Section):
    epochs: int = Field(30, ge=1, description="training epochs (the last one, with train.early_stop: at most)")
    batch_size: int = Field(64, ge=1, description="training samples per batch (per micro-batch with train.accumulate)")
    lr: float = Field(1e-3, gt=0, description="learning rate (AdamW's usual 1e-3; raise it for sgd)")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="sgd (with momentum) or adamw")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer=sgd only)")
    weight_decay: float = Field(1e-4, ge=0, description="L2 penalty (sgd) or decoupled weight decay (adamw)")
    scheduler: Literal["none", "step", "cosine", "plateau"] = Field(
        "none",
        description="epoch-level learning-rate schedule: none, step (StepLR), cosine (over the epochs after warm-up), "
        "plateau (ReduceLROnPlateau on validation accuracy)",
    )
    step_size: int = Field(30, ge=1, description="StepLR period in epochs")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor of step and plateau (plateau needs it below 1)")
    plateau_patience: int = Field(
        10, ge=0, description="scheduler=plateau: epochs without a validation accuracy gain before the lr is multiplied by gamma"
    )
    warmup_epochs: int = Field(
        0, ge=0,
        description="linear learning-rate warm-up per optimizer step over this many epochs (lr/steps up to lr), "
        "then the scheduler; 0 turns it off",
    )
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0 turns clipping off")
    precision: Literal["32", "bf16", "16"] = Field(
        "32",
        description="training forward pass: 32 (float32), bf16 (bfloat16 autocast, CPU or GPU), 16 (float16 autocast "
        "with gradient scaling, CUDA only); evaluation is always float32; 16 and 32 may be written as numbers",
    )
    accumulate: int = Field(
        1, ge=1, description="micro-batches per optimizer step (gradient accumulation); parts must support it"
    )
    early_stop: int = Field(
        0, ge=0, description="stop after this many epochs without a validation accuracy gain above early_stop_delta; 0 off"
    )
    early_stop_delta: float = Field(0.0, ge=0, description="smallest validation accuracy gain that resets early_stop's patience")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes; 0 loads in the training process")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    eval_batch_size: int = Field(256, ge=1, description="samples per batch in evaluation (changes no result)")
    pos_weight: Optional[Union[float, Literal["balanced"]]] = Field(
        None,
        description="multi-label data only: weight of each class's positive term in the binary cross-entropy; "
        "a number for every class, or balanced (#negatives / #positives of the class in the training split); unset: 1",
    )

    @field_validator("pos_weight", mode="before")
    @classmethod
    def _positive_weight(cls, value: Any) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and value != "balanced" and not (number and value > 0):
            raise ValueError("must be a number above 0, or balanced")
        return value

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        """``--set train.precision=16`` reads 16 as a number: the numbers 16 and 32 mean the settings "16" and "32"."""
        if type(value) is int and value in (16, 32):
            return str(value)
        return value

    @field_validator("gamma")
    @classmethod
    def _plateau_needs_decay(cls, value: float, info) -> float:
        if value >= 1 and info.data.get("scheduler") == "plateau":
            raise ValueError("must be below 1 with train.scheduler=plateau, which multiplies the lr by it")
        return value


class DataConfig(Section):
    name: str = Field("synthetic", description="the dataset (mmbalance list datasets); --dataset sets it")
    root: Optional[str] = Field(None, description="folder a dataset reads from")
    path: Optional[str] = Field(None, description="file a dataset reads from (npz)")
    views: Optional[list[str]] = Field(None, description="subset of modalities to use")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="fraction of the samples in the validation split (datasets without a fixed one)")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="fraction of the samples in the test split (datasets without a fixed one)")
    split_seed: Optional[int] = Field(None, description="seed of the split; the run seed if unset")
    on_error: Literal["raise", "skip"] = Field("raise", description="an unreadable sample file: raise stops with its name, skip leaves it out")
    heldout: Literal["val", "carve"] = Field(
        "val",
        description="held-out data methods may estimate on: the validation split, or a stratified carve of the training split (removed from training)",
    )
    heldout_fraction: float = Field(0.1, gt=0, lt=0.5, description="fraction of the training split carved out when data.heldout=carve")
    standardize: bool = Field(
        True,
        description="standardise float features (npz, mfeat, mnist_hog) with statistics of the training split as loaded; integer and token inputs never",
    )


class ModelConfig(Section):
    encoder: str = Field("auto", description="encoder for every modality; auto picks by input shape")
    encoders: dict[str, str] = Field(default_factory=dict, description="per-modality encoder override")
    pretrained: dict[str, str] = Field(
        default_factory=dict, description="per-modality path of local encoder weights (a saved state dict)"
    )
    fusion: str = Field("concat", description="fusion head (mmbalance list fusions)")
    feature_dim: int = Field(64, ge=1, description="size of each encoder's output feature")
    hidden_dim: int = Field(128, ge=1, description="width of the encoders' and fusion heads' hidden layers")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability in the encoders")


class EvalConfig(Section):
    """How predictions are scored and the best checkpoint is chosen (multi-label options: ``tasks.py``)."""

    threshold: Optional[Union[float, Literal["val"]]] = Field(
        None,
        description="multi-label data only: a class is predicted when its probability reaches this (0 < t < 1); "
        "val: the threshold of 0.01..0.99 maximising validation micro-F1, applied unchanged to test; unset: 0.5",
    )
    select: str = Field(
        "auto",
        description="validation metric that picks the best checkpoint and drives early stopping and the plateau "
        "schedule: auto (accuracy; micro_f1 on multi-label data), or accuracy, macro_f1, and on multi-label data "
        "micro_f1, weighted_f1, samples_f1, mAP",
    )

    @field_validator("threshold", mode="before")
    @classmethod
    def _inside_unit_interval(cls, value: Any) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and value != "val" and not (number and 0 < value < 1):
            raise ValueError("must be a number strictly between 0 and 1, or val")
        return value


class LogConfig(Section):
    backends: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["csv", "tensorboard"],
        description="where per-epoch scalars go besides metrics.jsonl: csv (scalars.csv), tensorboard (event file), "
        "wandb and mlflow (optional extras: pip install 'mmbalance[wandb]' / 'mmbalance[mlflow]')",
    )
    project: Optional[str] = Field(None, description="wandb project or mlflow experiment (default: mmbalance / the tracking default)")


CORE_SECTIONS: dict[str, type[Section]] = {
    "train": TrainConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "log": LogConfig,
    "eval": EvalConfig,
}
SCALAR_KEYS = {"method": str, "seed": int}
PRIVATE_KEYS = ("_recommended",)


def component_sections() -> dict[str, type[Section]]:
    """Sections owned by registered methods and datasets, by name."""
    sections: dict[str, type[Section]] = {}
    for registry in (METHODS, DATASETS):
        for name in registry.names():
            sections[name] = getattr(registry.get(name), "Config", Section)
    return sections


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=0.01'`` -> ``('train.lr', 0.01)``; values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"bad --set '{text}': expected section.key=value, e.g. train.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"bad --set '{text}': the key before '=' is empty")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice (line {line})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 1e-3 (no dot) as a string; users mean a number, as in Python.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (expected YAML in UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        message = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {message}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _validation_message(section: str, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join([section, *(str(p) for p in first["loc"])])
    value = first.get("input")
    return f"invalid value for {key}: {value!r} ({first['msg']})"


def _check_keys(section: str, schema: type[Section], values: dict) -> None:
    allowed = list(schema.model_fields)
    for key in values:
        if key not in allowed:
            hint = closest(key, allowed)
            did_you_mean = f"; did you mean '{section}.{hint}'?" if hint else ""
            listing = ", ".join(allowed) if allowed else "none"
            raise ConfigError(f"unknown config key '{section}.{key}'{did_you_mean} (allowed keys: {listing})")


def validate_section(section: str, schema: type[Section], values: Any) -> Section:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
    _check_keys(section, schema, values)
    try:
        return schema(**values)
    except ValidationError as exc:
        raise ConfigError(_validation_message(section, exc)) from None


class RunConfig:
    """The resolved configuration of one run."""

    def __init__(self, raw: dict):
        raw = copy.deepcopy(raw)
        components = component_sections()
        allowed = [*SCALAR_KEYS, *CORE_SECTIONS, *components, *PRIVATE_KEYS]
        for key in raw:
            if key not in allowed:
                hint = closest(key, allowed)
                did_you_mean = f"; did you mean '{hint}'?" if hint else ""
                raise ConfigError(
                    f"unknown config section '{key}'{did_you_mean} "
                    f"(allowed: {', '.join(SCALAR_KEYS)}, {', '.join(CORE_SECTIONS)}, or a method or dataset name)"
                )
        from .methods.compose import resolve  # the registry's parts, checked against the composition rules

        spec = self._scalar(raw, "method", "joint")
        parts = resolve(spec)
        for part in parts:
            if part.options:
                section = raw.setdefault(part.name, {})
                if not isinstance(section, dict):
                    raise ConfigError(f"config section '{part.name}' must be a mapping, got {section!r}")
                section.update(part.options)
        self.parts: list[str] = [p.name for p in parts]
        self.method: str = "+".join(self.parts)
        self.recommended: dict[str, str] = dict(raw.pop("_recommended", {}) or {})
        self.seed: int = self._scalar(raw, "seed", 0)
        if self.seed < 0:
            raise ConfigError(f"invalid value for seed: {self.seed} (must be >= 0)")
        self.train: TrainConfig = validate_section("train", TrainConfig, raw.get("train"))
        self.data: DataConfig = validate_section("data", DataConfig, raw.get("data"))
        self.model: ModelConfig = validate_section("model", ModelConfig, raw.get("model"))
        self.log: LogConfig = validate_section("log", LogConfig, raw.get("log"))
        self.eval: EvalConfig = validate_section("eval", EvalConfig, raw.get("eval"))
        DATASETS.get(self.data.name)
        self.sections: dict[str, Section] = {}
        for name, schema in components.items():
            if name in raw or name in (*self.parts, self.data.name):
                self.sections[name] = validate_section(name, schema, raw.get(name))

    @staticmethod
    def _scalar(raw: dict, key: str, default: Any) -> Any:
        value = raw.get(key, default)
        kind = SCALAR_KEYS[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"invalid value for {key}: {value!r} (expected {kind.__name__})")
        return value

    def section(self, name: str) -> Section:
        """The options of a method or dataset, with defaults filled in."""
        return self.sections[name]

    def part_configs(self) -> dict[str, Section]:
        """The options of every part of the method, objective first."""
        return {name: self.sections[name] for name in self.parts}

    @property
    def dataset_config(self) -> Section:
        return self.sections[self.data.name]

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method, "seed": self.seed}
        out["train"] = self.train.model_dump()
        out["data"] = self.data.model_dump()
        out["model"] = self.model.model_dump()
        out["log"] = self.log.model_dump()
        out["eval"] = self.eval.model_dump()
        for name, section in self.sections.items():
            out[name] = section.model_dump()
        return out

    def to_yaml(self) -> str:
        """The resolved config; settings a method recommended are named in a comment above it."""
        header = "".join(
            f"# {key}: recommended by {source}\n" for key, source in sorted(self.recommended.items())
        )
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides: Any) -> "RunConfig":
        """A copy with dotted overrides applied, validated again."""
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        raw["_recommended"] = dict(self.recommended)
        return RunConfig(raw)


def get_dotted(tree: dict, key: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def recommended_settings(spec: Any, user: dict) -> tuple[dict, dict[str, str]]:
    """The settings the method's parts recommend (``Part.defaults``) that the user left unset.

    A recommendation applies to the core sections and to the sections of
    parts in the run. Two parts recommending different values for a key the
    user did not set is an error: the user must choose.
    """
    from .methods.compose import resolve

    if not isinstance(spec, str):
        return {}, {}
    parts = [p.name for p in resolve(spec)]
    tree: dict = {}
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name in parts:
        for key, value in getattr(METHODS.get(name), "defaults", {}).items():
            section = key.split(".", 1)[0]
            if section not in CORE_SECTIONS and section not in parts:
                continue
            if get_dotted(user, key)[0]:
                continue
            if key in values and values[key] != value:
                raise ConfigError(
                    f"'{sources[key]}' recommends {key}={values[key]!r} and '{name}' recommends {value!r}; "
                    f"choose one with --set {key}=VALUE"
                )
            values[key], sources[key] = value, name
            set_dotted(tree, key, value)
    return tree, sources


def build_config(
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    dataset: str | None = None,
    method: str | None = None,
    seed: int | None = None,
) -> RunConfig:
    """Resolve defaults < dataset defaults < method recommendations < YAML file < flags < ``--set``.

    ``method`` is a spec (``midas[lam=0.5]+arl``); its bracketed options sit
    at the flags' level, so ``--set`` still overrides them.
    """
    from .methods.spec import parse_spec, spec_string

    user: dict = load_yaml(file) if file else {}
    flags: dict = {}
    if dataset is not None:
        set_dotted(flags, "data.name", dataset)
    if method is not None:
        parts = parse_spec(method)
        flags["method"] = spec_string(parts)
        for part in parts:
            for key, value in part.options.items():
                set_dotted(flags, f"{part.name}.{key}", value)
    if seed is not None:
        flags["seed"] = seed
    user = merge(user, flags)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(user, key, value)
    data_section = user.get("data") or {}
    dataset_name = data_section.get("name", "synthetic") if isinstance(data_section, dict) else "synthetic"
    defaults: dict = {}
    if isinstance(dataset_name, str) and dataset_name in DATASETS:
        for key, value in getattr(DATASETS.get(dataset_name), "defaults", {}).items():
            set_dotted(defaults, key, value)
    recommended, sources = recommended_settings(user.get("method", "joint"), user)
    raw = merge(merge(defaults, recommended), user)
    raw["_recommended"] = sources
    return RunConfig(raw)
