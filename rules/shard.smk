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
        s=dict(sorted({**config["shard"], "size": SHARD_SIZE}.items())),  # sorted: key order never reruns
        parts=len(SHARD_PARTS),
        upscale="--upscale" if config["shard"]["upscale"] else "",
    shell:
        "python -m landmarks.shard --selection {input.selection:q} --images {params.images:q} --split {wildcards.split} "
        "--part {wildcards.shardpart} --parts {params.parts} --out-dir {output:q} "
        "--resize-mode {params.s[resize_mode]} --size {params.s[size]} {params.upscale} "
        "--jpeg-quality {params.s[jpeg_quality]} --images-per-shard {params.s[images_per_shard]} "
        "--max-shard-bytes {params.s[max_shard_bytes]} --seed {params.s[seed]} --threads {threads} "
        "> {log:q} 2>&1"
