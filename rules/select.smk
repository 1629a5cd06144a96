# select: drop failed downloads and indoor images, apply the class rules, assign the splits.
# Cheap: editing the `select` section (vote threshold included) reruns only this and what follows.


rule select:
    input:
        manifests=expand(f"{R}/download/part-{{part}}/manifest.parquet", part=PARTS),
        scenes=expand(f"{R}/places365/part-{{part}}.parquet", part=PARTS) if config["places365"]["enabled"] else [],
    output:
        selection=f"{R}/select/selection.parquet",
        report=report(f"{R}/select/report.md", category="Data", caption="../report/select.rst"),
    log:
        f"{LOGS}/select.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        settings=as_json(select_settings()),
        scenes_flag="--scenes" if config["places365"]["enabled"] else "",
    shell:
        "python -m landmarks.select --manifests {input.manifests:q} {params.scenes_flag} {input.scenes:q} "
        "--out {output.selection:q} --report {output.report:q} --settings {params.settings:q} > {log:q} 2>&1"
