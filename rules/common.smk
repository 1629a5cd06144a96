# Helpers the rule files share.


def as_json(obj):
    """Settings handed to a stage: stable JSON, so Snakemake's params trigger reruns only on real edits."""
    return json.dumps(obj, sort_keys=True)


def experiment(name, section):
    """An experiment's merged settings, keys sorted: Snakemake compares params as text, so reordering
    keys in config.yaml must not look like an edit."""
    return json.loads(as_json(lmconfig.experiment_settings(config, name, CONFIG_SOURCE)[section]))


def shard_dirs(split):
    return expand(f"{R}/shards/{split}/part-{{k}}", k=SHARD_PARTS)


def download_settings():
    """The download section for the stage's --settings (null values mean "the stage's default")."""
    return as_json({k: v for k, v in config["download"].items() if v is not None})


def places365_settings():
    """The places365 section, less what steers the workflow (enabled) or sizes the job (gpus): editing
    those reruns nothing."""
    return {k: v for k, v in config["places365"].items() if k not in ("enabled", "gpus")}


def select_settings():
    """The select section; without the Places365 stage there are no scene votes to filter on."""
    if config["places365"]["enabled"]:
        return config["select"]
    return {**config["select"], "outdoor_rule": "none"}


def summary_settings():
    """The experiments section as far as summary reads it: each experiment's description."""
    return {name: {"description": (spec or {}).get("description", "")} for name, spec in config["experiments"].items()}


# train: settings and launcher per experiment (see rules/train.smk)


def train_settings(w):
    return experiment(w.experiment, "train")


def train_processes_per_node(w):
    return max(1, train_settings(w)["gpus"])


def train_threads_per_process(w):
    """Cores per training process: its DataLoader workers + the loop (on a CPU-only job, 4 for the math)."""
    s = train_settings(w)
    return s["workers"] + (1 if s["gpus"] else 4)


def train_torch_threads(w, threads):
    """torch's threads per process, from the cores Snakemake granted (it caps `threads` at --cores).
    On a GPU the math runs there, so the cores left by the DataLoader workers are enough; on the CPU the
    math dominates and the workers mostly wait, so torch gets every core (measured on the demo:
    22 images/s with 1 worker + 2 threads vs 13 with 1 + 1)."""
    s = train_settings(w)
    per_process = threads // train_processes_per_node(w) if s["nodes"] == 1 else threads
    return max(1, per_process - s["workers"]) if s["gpus"] else max(1, per_process)


def train_launcher(w):
    s = train_settings(w)
    if s["nodes"] > 1:
        return (
            f"srun --nodes={s['nodes']} --ntasks-per-node={train_processes_per_node(w)} --kill-on-bad-exit=1 "
            "python -m landmarks.train"
        )
    if s["gpus"] > 1:
        return f"torchrun --standalone --nproc_per_node={s['gpus']} -m landmarks.train"
    return "python -m landmarks.train"


# retrieve: settings and the shards geometric verification reads (see rules/retrieve.smk)


def retrieve_settings(w):
    """The experiment's retrieve section minus the keys that only size the SLURM job."""
    return {k: v for k, v in experiment(w.experiment, "retrieve").items() if k != "gpus"}


def verify_shards(w):
    """Geometric verification reads the images of the queries (test, and val with bank photos for the
    non-landmark threshold) and of the database from their shards."""
    if not retrieve_settings(w)["verify"]["neighbours"]:
        return []
    return shard_dirs("test") + shard_dirs("train") + shard_dirs("val") + shard_dirs("nonlandmark")


def predictor_settings(w):
    """What predict needs to treat a new photo as the pipeline treated a test photo (predictor.json)."""
    return {"embed": experiment(w.experiment, "embed"), "shard": {**config["shard"], "size": SHARD_SIZE}}


# predict: the photos to recognise (see rules/predict.smk)


def predict_settings():
    """The predict section less the experiment and the photos, which the rule passes as paths."""
    return {k: v for k, v in config["predict"].items() if k not in ("experiment", "inputs")}


def predict_inputs(w):
    if not config["predict"]["inputs"]:
        raise WorkflowError(
            f"{CONFIG_SOURCE}: predict.inputs is empty: list the photos, folders or CSV files " "of id,url to recognise"
        )
    return config["predict"]["inputs"]
