# summary: one table across every experiment of the run.


rule summary:
    input:
        expand(f"{R}/experiments/{{experiment}}/score/metrics.json", experiment=EXPERIMENTS),
    output:
        report(f"{R}/summary.md", category="Summary", caption="../report/summary.rst"),
    log:
        f"{LOGS}/summary.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        settings=as_json(summary_settings()),
    shell:
        "python -m landmarks.summary --metrics {input:q} --settings {params.settings:q} --out {output:q} "
        "> {log:q} 2>&1"
