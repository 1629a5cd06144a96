# retrieve[experiment]: faiss kNN of test queries against the train database, reranked with the
# non-landmark bank; writes the neighbours table, a Kaggle submission CSV and retrieve.json (sizes,
# timings, and the recall of an approximate index against exact search).

rule retrieve:
    input:
        database=f"{R}/experiments/{{experiment}}/embed/train.npy",
        queries=f"{R}/experiments/{{experiment}}/embed/test.npy",
        bank=f"{R}/experiments/{{experiment}}/embed/nonlandmark.npy",
    output:
        neighbours=f"{R}/experiments/{{experiment}}/retrieve/neighbours.parquet",
        predictions=f"{R}/experiments/{{experiment}}/retrieve/predictions.parquet",
        submission=f"{R}/experiments/{{experiment}}/retrieve/submission.csv",
        summary=f"{R}/experiments/{{experiment}}/retrieve/retrieve.json",
    params:
        s=lambda w: experiment(w.experiment, "retrieve"),
        out_dir=lambda w: f"{R}/experiments/{w.experiment}/retrieve",
        device=lambda w: "gpu" if experiment(w.experiment, "retrieve")["gpus"] else "auto",
        exclude_self=lambda w: "--exclude-self" if experiment(w.experiment, "retrieve")["exclude_self"] else "--no-exclude-self",
    log:
        f"{LOGS}/retrieve/{{experiment}}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=2 * 60,
        gpu=lambda w: experiment(w.experiment, "retrieve")["gpus"],
    conda:
        "../envs/torch.yaml"
    shell:
        "python -m landmarks.retrieve --database {input.database:q} --queries {input.queries:q} --bank {input.bank:q} "
        "--out-dir {params.out_dir:q} --k {params.s[k]} --prediction {params.s[prediction]} "
        "--rerank {params.s[rerank]} --bank-k {params.s[bank_k]} "
        "--neighbours-per-label {params.s[glr2020_neighbours_per_label]} "
        "--query-bank-k {params.s[glr2020_query_bank_k]} --index {params.s[index]} "
        "--ivf-lists {params.s[ivf_lists]} --pq-m {params.s[pq_m]} --nprobe {params.s[nprobe]} "
        "--recall-sample {params.s[recall_sample]} {params.exclude_self} "
        "--device {params.device} --threads {threads} > {log:q} 2>&1"
