"""Transformer-VQ paper pipeline: prepare data, train, evaluate.

Run from the repository root, for example
    snakemake --cores 1 results/enwik8/test_bpb.json --config preset=smoke
config/config.yaml holds the settings and workflow/schemas/config.schema.yaml checks them
before any job runs. Each rule runs one `tvq` command, and tvq/ holds the logic.
"""

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/report.smk"


rule all:
    """The paper's result files and the samples of every dataset in config["datasets"]."""
    default_target: True
    input:
        [
            path
            for dataset in config["datasets"]
            for path in result_files(dataset) + sample_files(dataset)
        ],


# One target rule per dataset, so `snakemake --cores 1 enwik8` builds that dataset's results
# and samples. The DVC evaluate stages build these targets, so they rebuild the samples
# whenever DVC has cleared results/{dataset}/ to re-evaluate.
for _dataset in DATASETS:

    rule:
        name:
            _dataset
        input:
            result_files(_dataset) + sample_files(_dataset),
