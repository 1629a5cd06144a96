# retrieve[experiment]: faiss kNN of test queries against the train database, reranked with the
# non-landmark bank; writes the neighbours table, a Kaggle submission CSV and retrieve.json (sizes,
# timings, and the recall of an approximate index against exact search). It also keeps what predict
# needs to answer new photos the same way: the faiss indexes, the database rows, and predictor.json
# (the embed and shard settings, and the non-landmark threshold chosen on val, with the val answers it
# was chosen on: calibration.parquet).


rule retrieve:
    input:
        database=f"{R}/experiments/{{experiment}}/embed/train.npy",
        queries=f"{R}/experiments/{{experiment}}/embed/test.npy",
        bank=f"{R}/experiments/{{experiment}}/embed/nonlandmark.npy",
        val=f"{R}/experiments/{{experiment}}/embed/val.npy",
        model=f"{R}/experiments/{{experiment}}/train/model.pt",  # its threshold folds (whitening_from: train+val)
        shards=verify_shards,
    output:
        neighbours=f"{R}/experiments/{{experiment}}/retrieve/neighbours.parquet",
        predictions=f"{R}/experiments/{{experiment}}/retrieve/predictions.parquet",
        submission=f"{R}/experiments/{{experiment}}/retrieve/submission.csv",
        summary=f"{R}/experiments/{{experiment}}/retrieve/retrieve.json",
        index=f"{R}/experiments/{{experiment}}/retrieve/index.faiss",
        bank_index=f"{R}/experiments/{{experiment}}/retrieve/bank.faiss",
        database=f"{R}/experiments/{{experiment}}/retrieve/database.parquet",
        predictor=f"{R}/experiments/{{experiment}}/retrieve/predictor.json",
        calibration=f"{R}/experiments/{{experiment}}/retrieve/calibration.parquet",
    log:
        f"{LOGS}/retrieve/{{experiment}}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=2 * 60,
        gpu=lambda w: experiment(w.experiment, "retrieve")["gpus"],
    params:
        settings=lambda w: as_json(retrieve_settings(w)),
        predictor=lambda w: as_json(predictor_settings(w)),
        out_dir=lambda w: f"{R}/experiments/{w.experiment}/retrieve",
        device=lambda w: "gpu" if experiment(w.experiment, "retrieve")["gpus"] else "auto",
    shell:
        "python -m landmarks.retrieve --database {input.database:q} --queries {input.queries:q} --bank {input.bank:q} "
        "--val {input.val:q} --model {input.model:q} --out-dir {params.out_dir:q} --settings {params.settings:q} --shards {input.shards:q} "
        "--predictor {params.predictor:q} "
        "--device {params.device} --threads {threads} > {log:q} 2>&1"
