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
        arch=config["places365"]["arch"],
        weights=config["places365"]["weights"] or "",
        labels_dir=config["places365"]["labels_dir"] or "",
        cache_dir=config["places365"]["cache_dir"] or "",
        timeout=config["places365"]["download_timeout_s"],
        top_k=config["places365"]["top_k"],
        batch_size=config["places365"]["batch_size"],
        workers=config["places365"]["workers"],
    shell:
        "python -m landmarks.places365 --manifest {input.manifest:q} --images {params.images:q} --out {output:q} "
        "--arch {params.arch} --weights={params.weights:q} --labels-dir={params.labels_dir:q} "
        "--cache-dir={params.cache_dir:q} --download-timeout {params.timeout} "
        "--top-k {params.top_k} --batch-size {params.batch_size} --workers {params.workers} "
        "> {log:q} 2>&1"
