# score[experiment]: GAP (Kaggle definition), accuracy, report and figures. The saliency figure runs the
# trained model (on the CPU, a few images), hence the torch env.

SCORE_FIGURES = ["examples", "precision_vs_rank", "score_distributions", "per_class_accuracy", "confusion", "saliency"]


rule score:
    input:
        predictions=f"{R}/experiments/{{experiment}}/retrieve/predictions.parquet",
        neighbours=f"{R}/experiments/{{experiment}}/retrieve/neighbours.parquet",
        retrieve_summary=f"{R}/experiments/{{experiment}}/retrieve/retrieve.json",
        selection=f"{R}/select/selection.parquet",
        train_summary=f"{R}/experiments/{{experiment}}/train/train.json",
        model=f"{R}/experiments/{{experiment}}/train/model.pt",
        shards=shard_dirs("test") + shard_dirs("train"),
        solution=[config["input"]["solution_csv"]] if config["input"]["solution_csv"] else [],
    output:
        metrics=f"{R}/experiments/{{experiment}}/score/metrics.json",
        report=f"{R}/experiments/{{experiment}}/score/report.md",
        figures=[
            report(
                f"{R}/experiments/{{experiment}}/score/{name}.png",
                category="Recognition",
                subcategory="{experiment}",
                caption=f"../report/{name}.rst",
            )
            for name in SCORE_FIGURES
        ],
    log:
        f"{LOGS}/score/{{experiment}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        out_dir=lambda w: f"{R}/experiments/{w.experiment}/score",
        solution=lambda w, input: f"--solution {shlex.quote(input.solution[0])}" if input.solution else "",
        # The embed section: the saliency figure feeds the model images as the embed stage did.
        embed_settings=lambda w: as_json(experiment(w.experiment, "embed")),
    shell:
        "python -m landmarks.score --predictions {input.predictions:q} --neighbours {input.neighbours:q} "
        "--selection {input.selection:q} {params.solution} --shards {input.shards:q} "
        "--train-summary {input.train_summary:q} --retrieve-summary {input.retrieve_summary:q} "
        "--model {input.model:q} --embed-settings {params.embed_settings:q} "
        "--experiment {wildcards.experiment} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"
