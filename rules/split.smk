# split: stream the URL CSV into P partitions (one download job each).


rule split:
    input:
        URLS_CSV,
    output:
        expand(f"{R}/split/part-{{part}}.parquet", part=PARTS),
    log:
        f"{LOGS}/split.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        settings=as_json(config["split"]),
        out_dir=lambda w, output: Path(output[0]).parent,
    shell:
        "python -m landmarks.split --csv {input:q} --settings {params.settings:q} --out-dir {params.out_dir:q} "
        "> {log:q} 2>&1"
