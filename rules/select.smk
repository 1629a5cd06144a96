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
        s=dict(sorted(config["select"].items())),  # sorted: reordering keys in config.yaml reruns nothing
        scenes_flag="--scenes" if config["places365"]["enabled"] else "",
        outdoor_rule=config["select"]["outdoor_rule"] if config["places365"]["enabled"] else "none",
        exclude=" ".join(str(c) for c in config["select"]["exclude_classes"]),
        top_n=config["select"]["top_n_classes"] or 0,
        max_per_class=config["select"]["max_images_per_class"] or 0,
    shell:
        "python -m landmarks.select --manifests {input.manifests:q} {params.scenes_flag} {input.scenes:q} "
        "--out {output.selection:q} --report {output.report:q} "
        "--outdoor-rule {params.outdoor_rule} --min-outdoor-votes {params.s[min_outdoor_votes]} "
        "--outdoor-top-k {params.s[outdoor_top_k]} --min-images-per-class {params.s[min_images_per_class]} "
        "--top-n-classes {params.top_n} --max-images-per-class {params.max_per_class} "
        "--exclude-classes {params.exclude} --val-fraction {params.s[val_fraction]} "
        "--test-fraction {params.s[test_fraction]} "
        "--nonlandmark-test-fraction {params.s[nonlandmark_test_fraction]} "
        "--min-train-per-class {params.s[min_train_per_class]} "
        "--val-min-class-images {params.s[val_min_class_images]} --seed {params.s[seed]} "
        "> {log:q} 2>&1"
