"""config.yaml: loading, JSON-schema validation with defaults, per-experiment settings.

The Snakefile validates the whole config at start-up with `validate_config`; stages run on their
own read the same file with `load_config`. Errors name the key (`train.epochs`) or the file.
"""

from __future__ import annotations

import argparse
import copy
import json
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml
from jsonschema import Draft202012Validator

from .common import StageError
from .pretrained import OFFLINE_WEIGHTS, backbone_mismatch

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
EXPERIMENT_SECTIONS = ("train", "embed", "retrieve")


class ConfigError(StageError):
    """The configuration is wrong; the message names the key or the file."""


@lru_cache(maxsize=1)
def load_schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _with_defaults(validator_class):
    """A validator that also fills in each property's `default` (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _with_defaults(Draft202012Validator)


def _key_path(error: jsonschema.ValidationError, prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in error.absolute_path]
    return ".".join(parts) or "(top level)"


def _describe(error: jsonschema.ValidationError, prefix: str = "") -> str:
    key = _key_path(error, prefix)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        where = f"under '{key}'" if key != "(top level)" else "at the top level"
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key {', '.join(repr(u) for u in unknown)} {where}{hint}"
    return f"key '{key}': {error.message}"


def _validate(instance, schema: dict, source: str, prefix: str = "") -> None:
    validator = _DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = "\n  ".join(_describe(e, prefix) for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n  {lines}")


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate `config` in place, filling defaults; also validate each experiment's merged sections."""
    schema = load_schema()
    _validate(config, schema, source)
    _check_train_ranges(config["train"], source, "train")  # here, so that the error names the key that was set
    select = config["select"]
    if select["val_fraction"] + select["test_fraction"] >= 1:
        raise ConfigError(
            f"{source}: keys 'select.val_fraction' ({select['val_fraction']}) and "
            f"'select.test_fraction' ({select['test_fraction']}) must sum to less than 1 "
            "(the rest of each class is train)"
        )
    for name in config["experiments"]:
        experiment_settings(config, name, source=source)
    return config


def load_config(path: str | Path | None) -> dict:
    """Read and validate a config file (None: all defaults, i.e. the demo)."""
    if path is None:
        return validate_config({}, "defaults")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as fh:
            config = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return validate_config(config, str(path))


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (override wins)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def section_settings(section: str, values: dict | None, source: str = "settings", prefix: str | None = None) -> dict:
    """One section (train/embed/retrieve, or a stage's own, e.g. download) validated on its own, defaults
    filled in: what a stage's `--settings` JSON is checked against."""
    values = copy.deepcopy(values or {})
    schema = load_schema()
    # Experiment sections live in $defs (experiments override them); the others are top-level properties.
    section_schema = schema["$defs"].get(section) or schema["properties"][section]
    _validate(values, {**section_schema, "$defs": schema["$defs"]}, source, prefix=prefix or section)
    if section == "train":
        _check_train_ranges(values, source, prefix or section)
    return values


def add_settings_argument(parser: argparse.ArgumentParser, section: str, flag: str = "--settings") -> None:
    """The one way a stage takes its config: `flag` holds config.yaml's `section` as a JSON object."""
    parser.add_argument(
        flag,
        default="{}",
        metavar="JSON",
        help=f"JSON object of config.yaml's {section} section; the schema's defaults fill the rest",
    )


def parse_settings(text: str | None, section: str, flag: str = "--settings", overrides: dict | None = None) -> dict:
    """A stage's `--settings` JSON, validated against config.yaml's `section` with its defaults filled in
    (errors name the key, as config.yaml's do). `overrides` that are not None (a stage's own flags for
    people calling it by hand) replace the JSON's values before the check."""
    try:
        values = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"{flag} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{flag} must be a JSON object (config.yaml's {section} section)")
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return section_settings(section, values, flag)


def _check_train_ranges(train: dict, source: str, prefix: str) -> None:
    """Pairs of train keys that bound a range: the lower one may not exceed the upper one."""
    for low, high, why in (
        ("min_lr", "lr", "the schedule decays from lr down to min_lr"),
        ("dynamic_margin_min", "dynamic_margin_max", "the rarest landmarks get the largest margin"),
    ):
        if train[low] > train[high]:
            raise ConfigError(f"{source}: key '{prefix}.{low}': {train[low]} is above '{high}' ({train[high]}); {why}")


def experiment_settings(config: dict, name: str, source: str = "config") -> dict:
    """The train/embed/retrieve sections of experiment `name`: global sections + its overrides."""
    if name not in config["experiments"]:
        known = ", ".join(sorted(config["experiments"]))
        raise ConfigError(f"{source}: unknown experiment {name!r} (defined: {known})")
    overrides = config["experiments"][name] or {}
    settings = {
        section: section_settings(
            section,
            deep_merge(config[section], overrides.get(section, {})),
            source,
            prefix=f"experiments.{name}.{section}",
        )
        for section in EXPERIMENT_SECTIONS
    }
    train = settings["train"]
    problem = unknown_backbone(train["backbone"])
    if problem:
        raise ConfigError(f"{source}: key 'experiments.{name}.train.backbone': {problem}")
    if train["pretrained"] in OFFLINE_WEIGHTS:  # offline ImageNet weights fit one architecture each
        problem = backbone_mismatch(train["pretrained"], train["backbone"])
        if problem:
            raise ConfigError(f"{source}: key 'experiments.{name}.train.pretrained': {problem}")
    return settings


PROJECT_BACKBONES = ("simple_cnn",)  # landmarks.model's own, beside timm's


@lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str]:
    """The architectures timm registers, read from its source (`@register_model` functions) rather than
    by importing timm: importing it imports torch, seconds that every Snakemake start would pay."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    registered = re.compile(r"@register_model\s*(?:\([^)]*\))?\s*\ndef\s+(\w+)\s*\(")
    return frozenset(
        name
        for path in (Path(spec.submodule_search_locations[0]) / "models").rglob("*.py")
        for name in registered.findall(path.read_text(errors="replace"))
    )


def unknown_backbone(name: str) -> str | None:
    """Why `name` is not a timm model (with the closest names), or None. A name the source scan does not
    find (a deprecated alias, a newer way of registering) is asked of timm itself before it is refused."""
    if name in PROJECT_BACKBONES or name.split(".", 1)[0] in timm_model_names():  # "resnet50.a1_in1k": a tag
        return None
    import difflib

    import timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
    return f"{name!r} is not a timm model" + (
        f" (closest: {', '.join(close)})" if close else " (timm.list_models() lists them)"
    )


def image_sizes_needed(config: dict) -> dict[str, int]:
    """The largest image side each experiment trains or embeds at (embed.image_size x its largest TTA
    scale; embed.image_size null = the training size)."""
    needed = {}
    for name in config["experiments"]:
        settings = experiment_settings(config, name)
        embed_size = settings["embed"]["image_size"] or settings["train"]["image_size"]
        needed[name] = max(settings["train"]["image_size"], round(embed_size * max(settings["embed"]["scales"])))
    return needed


def shard_size(config: dict) -> int:
    """shard.size, or when it is null the largest size any experiment trains or embeds at: shards are
    resized once, and an image stored smaller than the model reads it would be blown up again."""
    return config["shard"]["size"] or max(image_sizes_needed(config).values())


def demo_mode(config: dict) -> bool:
    """No URL list configured: run the built-in offline demo."""
    return not config["input"]["urls_csv"]


def urls_csv_path(config: dict) -> str:
    """The URL list the workflow starts from: the user's CSV, or the demo's generated one."""
    if demo_mode(config):
        return str(Path(config["demo"]["out_dir"]) / "urls.csv")
    return config["input"]["urls_csv"]


def check_input_files(config: dict, source: str = "config", base: Path | None = None) -> None:
    """Fail early, naming the key and the path, when a file the config points at is missing."""
    base = base or Path.cwd()

    def must_exist(key: str, value, kind: str = "file") -> None:
        if value is None:
            return
        path = Path(value) if Path(value).is_absolute() else base / value
        ok = path.is_dir() if kind == "folder" else path.is_file()
        if not ok:
            raise ConfigError(f"{source}: key '{key}': {kind} not found: {value}")

    must_exist("input.urls_csv", config["input"]["urls_csv"])
    must_exist("input.solution_csv", config["input"]["solution_csv"])
    must_exist("places365.weights", config["places365"]["weights"])
    must_exist("places365.labels_dir", config["places365"]["labels_dir"], kind="folder")
    for name in config["experiments"]:
        pretrained = experiment_settings(config, name, source)["train"]["pretrained"]
        if pretrained not in ("timm", "none", *OFFLINE_WEIGHTS):
            must_exist(f"experiments.{name}.train.pretrained", pretrained)
