# Helpers the rule files share.


def as_json(obj):
    """Settings handed to a stage: stable JSON, so Snakemake's params trigger reruns only on real edits."""
    return json.dumps(obj, sort_keys=True)


def experiment(name, section):
    return lmconfig.experiment_settings(config, name, CONFIG_SOURCE)[section]


def shard_dirs(split):
    return expand(f"{R}/shards/{split}/part-{{k}}", k=SHARD_PARTS)


def download_settings():
    """The download section for the stage's --settings (null values mean "the stage's default")."""
    return as_json({k: v for k, v in config["download"].items() if v is not None})
