# embed[experiment, split]: L2-normalised embeddings (float16) with an id table in the same order;
# optional flip / multi-scale test-time augmentation, bf16 AMP on a GPU. The default DAG embeds train,
# test and nonlandmark (what retrieve needs); `snakemake results/experiments/X/embed/val.npy` embeds val.


rule embed:
    input:
        model=f"{R}/experiments/{{experiment}}/train/model.pt",
        shards=lambda w: shard_dirs(w.split),
    output:
        embeddings=f"{R}/experiments/{{experiment}}/embed/{{split}}.npy",
        ids=f"{R}/experiments/{{experiment}}/embed/{{split}}.ids.parquet",
    log:
        f"{LOGS}/embed/{{experiment}}-{{split}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=6 * 60,
        gpu=lambda w: experiment(w.experiment, "embed")["gpus"],
    params:
        settings=lambda w: as_json(experiment(w.experiment, "embed")),
        device=lambda w: "cuda" if experiment(w.experiment, "embed")["gpus"] else "auto",
    shell:
        "python -m landmarks.embed --model {input.model:q} --shards {input.shards:q} --out {output.embeddings:q} "
        "--settings {params.settings:q} --device {params.device} --threads {threads} "
        "> {log:q} 2>&1"
