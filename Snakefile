# Landmark recognition pipeline: urls.csv -> download -> Places365 -> select -> shard -> train -> embed
# -> retrieve -> score -> summary. One rule file per stage under rules/, each calling the stage's entry
# point `python -m landmarks.<stage>` (which also runs on its own). See README.md.

import json
import re
import shlex
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)  # the Snakefile itself uses the package's config helpers
from landmarks import config as lmconfig
from landmarks.tables import SPLITS

# `--configfile X` replaces config.yaml instead of merging into it: a reproduction config is complete
# on its own (missing keys take the schema's defaults), and never inherits the demo's experiments.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


CONFIG_SOURCE = ", ".join(str(p) for p in workflow.config_settings.configfiles) or "config.yaml"
try:
    lmconfig.validate_config(config, CONFIG_SOURCE)
    lmconfig.check_input_files(config, CONFIG_SOURCE)
except lmconfig.ConfigError as err:
    raise WorkflowError(str(err)) from None

R = config["results_dir"]
LOGS = f"{R}/logs"
DEMO = lmconfig.demo_mode(config)
URLS_CSV = lmconfig.urls_csv_path(config)
IMAGES = f"{R}/download/images"
PARTS = [f"{p:03d}" for p in range(config["split"]["partitions"])]
SHARD_PARTS = [f"{k:02d}" for k in range(config["shard"]["parts"])]
EXPERIMENTS = list(config["experiments"])
SHARD_SIZE = lmconfig.shard_size(config)
for _name, _size in lmconfig.image_sizes_needed(config).items():
    if _size > SHARD_SIZE and config["shard"]["resize_mode"] in ("shorter_side", "center_crop"):
        print(
            f"Warning: experiment {_name} reads images at {_size} px but shard.size is {SHARD_SIZE}: they will "
            f"be enlarged from the shards (set shard.size to {_size} or null)",
            file=sys.stderr,
        )
# Rules run the package from this checkout, whatever Python environment (venv or conda) runs them.
shell.prefix(
    f"export PYTHONPATH={shlex.quote(SRC)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)  # braces doubled: Snakemake formats it too


wildcard_constraints:
    part=r"\d{3}",
    shardpart=r"\d{2}",
    split="|".join(SPLITS),
    experiment="|".join(map(re.escape, EXPERIMENTS)) or "none",


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/split.smk"
include: "rules/download.smk"
include: "rules/places365.smk"
include: "rules/select.smk"
include: "rules/shard.smk"
include: "rules/train.smk"
include: "rules/embed.smk"
include: "rules/retrieve.smk"
include: "rules/score.smk"
include: "rules/summary.smk"
include: "rules/predict.smk"


rule all:
    default_target: True
    input:
        f"{R}/summary.md",
        # val embeddings are not needed for scoring, but researchers expect all four splits embedded
        expand(f"{R}/experiments/{{experiment}}/embed/val.npy", experiment=EXPERIMENTS),


# The demo's URLs point at a local HTTP server (127.0.0.1, so demo download jobs must run on this
# machine: locally, or on a single-node cluster). It runs for as long as the workflow does, and exits by
# itself if Snakemake is killed.
_demo_server = {}


onstart:
    if DEMO:
        from landmarks.demo.server import start_server_process

        _demo_server["process"] = start_server_process(
            config["demo"]["out_dir"],
            config["demo"]["host"],
            config["demo"]["port"],
            log_path=f"{LOGS}/demo_server.log",
        )


onsuccess:
    if _demo_server:
        from landmarks.demo.server import stop_server_process

        stop_server_process(_demo_server.pop("process"))


onerror:
    if _demo_server:
        from landmarks.demo.server import stop_server_process

        stop_server_process(_demo_server.pop("process"))
