# download[part]: fetch one partition's URLs into the shared image tree; one manifest row per URL.
# Resumable: a rerun after a crash fetches only what is missing (its journal lives beside the manifest).
# download.mode gldv2: gldv2_fetch[k] jobs fetch and verify the official tar shards instead, and each
# download[part] builds the same manifest from the shards' indexes.

GLDV2 = config["download"]["mode"] == "gldv2"


if GLDV2:
    GLDV2_INDEX = f"{R}/download/gldv2"

    rule gldv2_fetch:
        output:
            # fetch job k writes the indexes of shards k, k+P, k+2P, ...; this marker says it finished
            touch(f"{GLDV2_INDEX}/fetch-{{part}}.done"),
        log:
            f"{LOGS}/download/gldv2-fetch-{{part}}.log",
        conda:
            "../envs/pipeline.yaml"
        threads: config["download"]["threads"]
        resources:
            mem_mb=4000,
            runtime=24 * 60,
        params:
            images=IMAGES,
            index_dir=GLDV2_INDEX,
            jobs=len(PARTS),
            settings=download_settings(),
        shell:
            "python -m landmarks.gldv2 fetch --jobs {params.jobs} --job {wildcards.part} --images {params.images:q} "
            "--index-dir {params.index_dir:q} --settings {params.settings:q} > {log:q} 2>&1"

    rule download:
        input:
            part=f"{R}/split/part-{{part}}.parquet",
            fetched=expand(f"{GLDV2_INDEX}/fetch-{{part}}.done", part=PARTS),
        output:
            f"{R}/download/part-{{part}}/manifest.parquet",
        log:
            f"{LOGS}/download/part-{{part}}.log",
        conda:
            "../envs/pipeline.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=60,
        params:
            index_dir=GLDV2_INDEX,
        shell:
            "python -m landmarks.gldv2 manifest --part {input.part:q} --index-dir {params.index_dir:q} "
            "--out {output:q} > {log:q} 2>&1"

else:

    rule download:
        input:
            f"{R}/split/part-{{part}}.parquet",
        output:
            f"{R}/download/part-{{part}}/manifest.parquet",
        log:
            f"{LOGS}/download/part-{{part}}.log",
        conda:
            "../envs/pipeline.yaml"
        threads: config["download"]["threads"]
        resources:
            mem_mb=2000,
            runtime=24 * 60,
        params:
            images=IMAGES,
            settings=download_settings(),
        shell:
            "python -m landmarks.download --part {input:q} --images {params.images:q} --out {output:q} "
            "--settings {params.settings:q} --no-progress > {log:q} 2>&1"
