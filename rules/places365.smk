# places365[part]: Places365 scene categories of each downloaded image (GPU when present). Stores the
# top-k categories, probabilities and outdoor flags, so changing the vote rule reruns only `select`.


rule places365:
    input:
        manifest=f"{R}/download/part-{{part}}/manifest.parquet",
    output:
        f"{R}/places365/part-{{part}}.parquet",
    log:
        f"{LOGS}/places365/part-{{part}}.log",
    conda:
        "../envs/torch.yaml"
    threads: max(1, config["places365"]["workers"])
    resources:
        mem_mb=8000,
        runtime=12 * 60,
        gpu=config["places365"]["gpus"],
    params:
        images=IMAGES,
        settings=as_json(places365_settings()),
    shell:
        "python -m landmarks.places365 --manifest {input.manifest:q} --images {params.images:q} --out {output:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"
