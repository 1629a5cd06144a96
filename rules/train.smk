# train[experiment]: fine-tune backbone + GeM + embedding head on the train shards; model selection by
# GAP on val. Checkpoints let a killed or requeued job resume.

rule train:
    input:
        train=shard_dirs("train"),
        val=shard_dirs("val"),
    output:
        model=f"{R}/experiments/{{experiment}}/train/model.pt",
        metrics=f"{R}/experiments/{{experiment}}/train/metrics.csv",
        summary=f"{R}/experiments/{{experiment}}/train/train.json",
        curves=report(f"{R}/experiments/{{experiment}}/train/curves.png", category="Training",
                      subcategory="{experiment}", caption="../report/curves.rst"),
    params:
        settings=lambda w: as_json(experiment(w.experiment, "train")),
        out_dir=lambda w: f"{R}/experiments/{w.experiment}/train",
    log:
        f"{LOGS}/train/{{experiment}}.log",
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=lambda w: experiment(w.experiment, "train")["gpus"],
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m landmarks.train --train-shards {input.train:q} --val-shards {input.val:q} "
        "--out-dir {params.out_dir:q} --settings {params.settings:q} --threads {threads} "
        "> {log:q} 2>&1"
