# Names, paths and command-line fragments shared by the rules.

import os
import shlex
import sys
from pathlib import Path

# Jobs call `tvq` from PATH. Putting the scripts folder of the Python that runs Snakemake
# first lets `.venv/bin/snakemake` work without activating the virtual environment.
os.environ["PATH"] = os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
)

DATASETS = ("enwik8", "pg19", "imagenet64")
PRESETS = ("smoke", "cpu", "paper")

# Metric in each dataset's result file names: bits per byte, word-level perplexity,
# bits per dimension (named bpb like the paper's ImageNet64 table).
METRIC = {"enwik8": "bpb", "pg19": "ppl", "imagenet64": "bpb"}

# Splits scored for `all` and the per-dataset targets.
RESULT_SPLITS = {"enwik8": ("validation", "test"), "pg19": ("test",), "imagenet64": ("test",)}


wildcard_constraints:
    dataset="|".join(DATASETS),
    preset="|".join(PRESETS),
    split="validation|test",
    metric="bpb|ppl",


localrules:
    all,
    samples,


def result_files(dataset):
    """Return the result JSON paths that the dataset's target builds."""
    return [f"results/{dataset}/{split}_{METRIC[dataset]}.json" for split in RESULT_SPLITS[dataset]]


def run_dir(dataset, preset):
    """Return the training folder: checkpoints, metrics.jsonl, config.yaml, train_summary.json."""
    return f"runs/{dataset}/{preset}"


def is_url(source):
    return "://" in source


def tfds_options():
    """Return the --tfds-data-dir option, empty when TFDS's own default is wanted."""
    if config["tfds_data_dir"] is None:
        return ""
    return f"--tfds-data-dir {shlex.quote(config['tfds_data_dir'])}"


def launcher():
    """Return the command prefix for accelerator jobs (see the tpu profile), space-ended."""
    return f"{config['launcher']} " if config["launcher"] else ""
