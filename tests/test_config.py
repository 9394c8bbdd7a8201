"""TransformerConfig validation: one clear message per problem."""

import pytest

from tvq import ConfigError, TransformerConfig

VALID = dict(d_model=64, d_k=16, n_code=8, n_layer=1, block_len=8, sequence_len=32)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(sequence_len=36), "sequence_len 36 is not a multiple of block_len 8"),
        (dict(sequence_len=16), "at least 3 are needed"),
        (dict(head_type="mqa", d_k=24), "d_model 64 is not a multiple of d_k 24"),
        (dict(head_type="mha", d_k=24), "d_model 64 is not a multiple of d_k 24"),
        (dict(attn_type="linear"), "unknown attn_type 'linear'; choose one of vq, full"),
        (dict(head_type="gqa"), "unknown head_type 'gqa'"),
        (dict(reduction_type="cumsum"), "unknown reduction_type 'cumsum'"),
        (dict(dtype="float16"), "unknown dtype 'float16'"),
        (dict(remat="some"), "unknown remat 'some'"),
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(n_code=-4), "n_code must be a positive integer, got -4"),
        (dict(n_layer=2.5), "n_layer must be a positive integer, got 2.5"),
        (dict(block_len=True), "block_len must be a positive integer, got True"),
        (dict(p_dropsin=1.0), "p_dropsin must be in [0, 1), got 1.0"),
        (dict(p_dropres=-0.1), "p_dropres must be in [0, 1), got -0.1"),
        (dict(p_droplyr=1.5), "p_droplyr must be in [0, 1), got 1.5"),
        (dict(c_gamma=1.0), "c_gamma must be in [0, 1), got 1.0"),
    ],
)
def test_invalid_config_message(changes, message):
    with pytest.raises(ConfigError) as error:
        TransformerConfig(**{**VALID, **changes})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_shga_accepts_d_model_not_multiple_of_d_k():
    config = TransformerConfig(**{**VALID, "d_k": 24})
    assert (config.n_head, config.n_kv_head, config.d_v) == (1, 1, 128)


def test_derived_head_shapes():
    mqa = TransformerConfig(**{**VALID, "head_type": "mqa"})
    mha = TransformerConfig(**{**VALID, "head_type": "mha"})
    assert (mqa.n_head, mqa.n_kv_head, mqa.d_v, mqa.d_ff) == (4, 1, 16, 320)
    assert (mha.n_head, mha.n_kv_head, mha.d_v, mha.d_ff) == (4, 4, 16, 256)


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as error:
        TransformerConfig(**{**VALID, "p_dropres": 2.0, "attn_type": "x"})
    assert "p_dropres" in str(error.value)
    assert "attn_type" in str(error.value)


def test_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("d_model: 64\nd_k: 16\nblock_len: 8\nsequence_len: 32\nhead_type: mha\n")
    config = TransformerConfig.from_yaml(path, n_layer=3)
    assert (config.d_model, config.head_type, config.n_layer) == (64, "mha", 3)


def test_from_yaml_unknown_key(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("d_model: 64\nn_heads: 4\n")
    with pytest.raises(ConfigError, match="unknown model config key.* n_heads"):
        TransformerConfig.from_yaml(path)


def test_from_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TransformerConfig.from_yaml(tmp_path / "absent.yaml")


def test_from_yaml_not_a_mapping(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        TransformerConfig.from_yaml(path)
