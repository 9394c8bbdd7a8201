"""Run configs: dataset files, preset overlays, overrides, and the command line's help."""

from pathlib import Path

import pytest
import yaml

from tests.runs import run_tvq
from tvq.model.config import ConfigError
from tvq.train.config import RunConfig, config_differences, load_run_config, parse_override

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
DATASETS = ("enwik8", "pg19", "imagenet64")
PRESETS = ("smoke", "cpu", "paper")

# The paper's training configurations, per dataset.
PAPER = {
    "enwik8": dict(
        global_batch_size=32, sequence_len=8192, d_model=768, n_vocab=259,
        p_dropsin=0.2, p_dropres=0.5, p_droplyr=0.3, e_tie=False, e_preln=False,
        e_scale=1.0, optimizer="adamw", lr_max=4e-4, grad_clip=0.1, wd_lam=2e-4,
        n_max_step=125_000,
    ),
    "pg19": dict(
        global_batch_size=32, sequence_len=8192, d_model=2048, n_vocab=32_000,
        p_dropsin=0.1, p_dropres=0.1, p_droplyr=0.1, e_tie=True, e_preln=True,
        e_scale=0.005, optimizer="adafactor", lr_max=1e-2, grad_clip=0.0, wd_lam=0.0,
        n_max_step=500_000,
    ),
    "imagenet64": dict(
        global_batch_size=16, sequence_len=12_288, d_model=2048, n_vocab=259,
        p_dropsin=0.1, p_dropres=0.0, p_droplyr=0.0, e_tie=True, e_preln=True,
        e_scale=0.005, optimizer="adafactor", lr_max=1e-2, grad_clip=0.0, wd_lam=0.0,
        n_max_step=500_000,
    ),
}


def files(dataset, preset):
    return [CONFIG_DIR / f"{dataset}.yaml", CONFIG_DIR / "presets" / f"{preset}.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_and_preset_loads(dataset, preset):
    config = load_run_config(files(dataset, preset))
    assert config.train.preset == preset


@pytest.mark.parametrize("dataset", DATASETS)
def test_paper_preset_has_the_paper_settings(dataset):
    values = load_run_config(files(dataset, "paper")).to_dict()
    expected = {
        **PAPER[dataset], "block_len": 512, "n_code": 512, "d_k": 128, "n_layer": 24,
        "head_type": "shga", "attn_type": "vq", "n_warmup_step": 10_000,
    }
    assert {key: values[key] for key in expected} == expected


def test_later_files_and_overrides_win(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("d_model: 128\nlr_max: 1e-3\n")
    config = load_run_config(
        [CONFIG_DIR / "enwik8.yaml", overlay], ["n_layer=2", "lr_max=2e-3", "e_tie=true"]
    )
    assert (config.model.d_model, config.model.n_layer, config.model.e_tie) == (128, 2, True)
    # YAML 1.1 reads 2e-3 as a string; the config reads it as the number it means.
    assert config.train.lr_max == 2e-3


def test_resolved_config_loads_back(tmp_path):
    config = load_run_config(files("enwik8", "smoke"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_run_config([path]) == config


def test_unknown_and_invalid_values_are_errors(tmp_path):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("d_modle: 128\n")
    with pytest.raises(ConfigError, match="unknown config key.* d_modle; valid keys"):
        load_run_config([CONFIG_DIR / "enwik8.yaml", overlay])
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"global_batch_size": 0, "head_type": "gqa", "lr_max": "fast"})
    message = str(error.value)
    assert "global_batch_size must be a positive integer, got 0" in message
    assert "unknown head_type 'gqa'" in message
    assert "lr_max must be a finite, non-negative number, got 'fast'" in message
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"e_tie": "maybe", "e_scale": "abc", "seed": 2**64, "grad_clip": 1e999})
    message = str(error.value)
    assert "e_tie must be true or false, got 'maybe'" in message
    assert "e_scale must be a finite number, got 'abc'" in message
    assert "seed must be below 2**32" in message
    assert "grad_clip must be a finite, non-negative number, got inf" in message
    with pytest.raises(ConfigError, match="config file .*missing.yaml not found"):
        load_run_config([tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("lr_max")


def test_resume_allows_schedule_changes_only():
    saved = load_run_config(files("enwik8", "smoke")).to_dict()
    changed = {**saved, "n_max_step": 10**6, "lr_max": 1.0, "n_save_keep": 9, "wd_lam": 0.5}
    assert config_differences(saved, changed) == []
    changed.update(d_model=96, optimizer="lion")
    assert config_differences(saved, changed) == [
        "d_model: 64 -> 96", "optimizer: 'adamw' -> 'lion'",
    ]


def test_help_explains_every_subcommand():
    top = run_tvq("--help")
    assert top.returncode == 0
    for command in ("prepare", "vocab", "train", "evaluate", "bench"):
        assert command in top.stdout
    for command, options in {
        "train": ("--config", "--set", "--data-dir", "--workdir", "SIGTERM"),
        "evaluate": ("--split", "--out", "--max-tokens", "partial"),
        "prepare": ("--dataset", "--source", "--out-dir"),
        "vocab": ("--vocab-size", "--out"),
    }.items():
        done = run_tvq(command, "--help")
        assert done.returncode == 0
        for option in options:
            assert option in done.stdout, (command, option)
