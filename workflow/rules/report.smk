# Result notebooks (tvq report): each rule runs one notebook of workflow/notebooks with
# papermill and writes it executed to results/notebooks/, with its HTML rendering and
# its PNG figures in results/figures/. The notebooks only read the files listed as input.

import json

FIGURES_DIR = "results/figures"


# Rendering takes seconds and reads small files, so a cluster profile runs it where
# Snakemake runs instead of queueing a job.
localrules:
    report,
    report_results,
    report_throughput,
    report_training,


def report_command(name, parameters):
    """Return the `tvq report` command for workflow/notebooks/{name}.ipynb.

    parameters maps notebook parameters to values; each is passed as JSON, which
    `tvq report --set` reads as YAML.
    """
    settings = {**parameters, "figures_dir": FIGURES_DIR}
    options = " ".join(
        "--set " + shlex.quote(f"{key}={json.dumps(value)}") for key, value in settings.items()
    )
    return (
        f"tvq report workflow/notebooks/{name}.ipynb --out results/notebooks/{name}.ipynb"
        f" --html results/notebooks/{name}.html {options}"
    )


def report_result_files():
    return [path for dataset in config["datasets"] for path in result_files(dataset)]


def report_run_dirs():
    return {dataset: run_dir(dataset, config["preset"]) for dataset in config["datasets"]}


rule report_results:
    """Render the results notebook: each dataset's results against the paper's figures."""
    input:
        notebook="workflow/notebooks/results.ipynb",
        results=report_result_files(),
    output:
        notebook="results/notebooks/results.ipynb",
        html="results/notebooks/results.html",
        figure=f"{FIGURES_DIR}/results.png",
    params:
        command=report_command("results", {"result_files": report_result_files()}),
    log:
        "logs/report/results.log",
    benchmark:
        "benchmarks/report/results.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.command} > {log} 2>&1"


rule report_throughput:
    """Render the throughput notebook: tokens/s and vq's speed-up against sequence length."""
    input:
        notebook="workflow/notebooks/throughput.ipynb",
        table="results/throughput/throughput.csv",
        speedup="results/throughput/speedup.csv",
    output:
        notebook="results/notebooks/throughput.ipynb",
        html="results/notebooks/throughput.html",
        throughput=f"{FIGURES_DIR}/throughput.png",
        speedup=f"{FIGURES_DIR}/speedup.png",
    params:
        command=report_command(
            "throughput",
            {
                "throughput_csv": "results/throughput/throughput.csv",
                "speedup_csv": "results/throughput/speedup.csv",
            },
        ),
    log:
        "logs/report/throughput.log",
    benchmark:
        "benchmarks/report/throughput.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.command} > {log} 2>&1"


rule report_training:
    """Render the training notebook: loss, learning rate and codebook use of each run."""
    input:
        notebook="workflow/notebooks/training.ipynb",
        # metrics.jsonl, which the notebook also reads, is written beside these files
        # before them; the train rule does not declare it as an output.
        runs=[
            f"{folder}/{name}"
            for folder in report_run_dirs().values()
            for name in ("train_summary.json", "train_curve.csv", "validation_curve.csv")
        ],
    output:
        notebook="results/notebooks/training.ipynb",
        html="results/notebooks/training.html",
        curves=f"{FIGURES_DIR}/training_curves.png",
        codebook=f"{FIGURES_DIR}/codebook_usage.png",
    params:
        command=report_command("training", {"run_dirs": report_run_dirs()}),
    log:
        "logs/report/training.log",
    benchmark:
        "benchmarks/report/training.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.command} > {log} 2>&1"


rule report:
    """All three result notebooks, their HTML renderings and figures."""
    input:
        rules.report_results.output,
        rules.report_throughput.output,
        rules.report_training.output,
