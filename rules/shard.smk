# shard[split, k]: resize the selected images once and pack them into WebDataset tar shards.


rule shard:
    input:
        selection=f"{R}/select/selection.parquet",
    output:
        directory(f"{R}/shards/{{split}}/part-{{shardpart}}"),
    log:
        f"{LOGS}/shard/{{split}}-{{shardpart}}.log",
    conda:
        "../envs/pipeline.yaml"
    threads: config["shard"]["threads"]
    resources:
        mem_mb=4000,
        runtime=6 * 60,
    params:
        images=IMAGES,
        settings=as_json({**config["shard"], "size": SHARD_SIZE}),
    shell:
        "python -m landmarks.shard --selection {input.selection:q} --images {params.images:q} --split {wildcards.split} "
        "--part {wildcards.shardpart} --out-dir {output:q} --settings {params.settings:q} --threads {threads} "
        "> {log:q} 2>&1"
