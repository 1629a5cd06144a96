# download[part]: fetch one partition's URLs into the shared image tree; one manifest row per URL.
# Resumable: a rerun after a crash fetches only what is missing (its journal lives beside the manifest).

rule download:
    input:
        f"{R}/split/part-{{part}}.parquet",
    output:
        f"{R}/download/part-{{part}}/manifest.parquet",
    params:
        images=IMAGES,
        settings=as_json(config["download"]),
    log:
        f"{LOGS}/download/part-{{part}}.log",
    threads: config["download"]["threads"]
    resources:
        mem_mb=2000,
        runtime=24 * 60,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m landmarks.download --part {input:q} --images {params.images:q} --out {output:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"
