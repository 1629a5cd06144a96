# predict: recognise new photos (config predict.inputs: files, folders, CSVs of id,url) with a trained
# experiment, on request: `snakemake predict`. It reuses every cached stage; editing the predict section
# reruns only this rule. A photo that cannot be read is reported in the outputs (the stage exits 1), so
# the job still succeeds with the other photos' answers.

PREDICT_EXPERIMENT = config["predict"]["experiment"] or EXPERIMENTS[0]
if PREDICT_EXPERIMENT not in EXPERIMENTS:
    raise WorkflowError(
        f"{CONFIG_SOURCE}: key 'predict.experiment': {PREDICT_EXPERIMENT!r} is not one of the "
        f"experiments ({', '.join(EXPERIMENTS)})"
    )
PREDICT_DIR = f"{R}/experiments/{PREDICT_EXPERIMENT}/predict"


rule predict:
    input:
        photos=predict_inputs,
        model=f"{R}/experiments/{PREDICT_EXPERIMENT}/train/model.pt",
        predictor=f"{R}/experiments/{PREDICT_EXPERIMENT}/retrieve/predictor.json",
        index=f"{R}/experiments/{PREDICT_EXPERIMENT}/retrieve/index.faiss",
        bank_index=f"{R}/experiments/{PREDICT_EXPERIMENT}/retrieve/bank.faiss",
        database=f"{R}/experiments/{PREDICT_EXPERIMENT}/retrieve/database.parquet",
        calibration=f"{R}/experiments/{PREDICT_EXPERIMENT}/retrieve/calibration.parquet",  # predict.landmark_share
        shards=shard_dirs("train"),
    output:
        jsonl=f"{PREDICT_DIR}/predictions.jsonl",
        csv=f"{PREDICT_DIR}/predictions.csv",
        submission=f"{PREDICT_DIR}/submission.csv",
        page=f"{PREDICT_DIR}/index.html",
    log:
        f"{LOGS}/predict/{PREDICT_EXPERIMENT}.log",
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=lambda w: experiment(PREDICT_EXPERIMENT, "embed")["gpus"],
    params:
        experiment=lambda w, input: Path(input.model).parent.parent,
        out_dir=lambda w, output: Path(output.page).parent,
        settings=as_json(predict_settings()),
        download=download_settings(),
        device=lambda w: "cuda" if experiment(PREDICT_EXPERIMENT, "embed")["gpus"] else "auto",
    shell:
        "python -m landmarks.predict --experiment {params.experiment:q} {input.photos:q} --out-dir {params.out_dir:q} "
        "--settings {params.settings:q} --download-settings {params.download:q} "
        "--device {params.device} --threads {threads} --no-progress > {log:q} 2>&1 || test $? -eq 1"
