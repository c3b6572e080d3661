"""TransformerConfig: the paper's presets, validation with clear messages, YAML round trips."""

import pytest

from aiayn.config import PRESETS, TransformerConfig
from aiayn.errors import ConfigError


def test_base_and_big_presets_are_table_3():
    base = TransformerConfig.from_preset("base")
    assert (
        base.n_encoder_layers,
        base.n_decoder_layers,
        base.d_model,
        base.d_ff,
        base.n_heads,
    ) == (6, 6, 512, 2048, 8)
    assert (base.d_k, base.dropout) == (64, 0.1)
    big = TransformerConfig.from_preset("big")
    assert (big.n_encoder_layers, big.n_decoder_layers, big.d_model, big.d_ff, big.n_heads) == (
        6,
        6,
        1024,
        4096,
        16,
    )
    assert (big.d_k, big.dropout) == (64, 0.3)


def test_paper_defaults():
    cfg = TransformerConfig()
    assert cfg == TransformerConfig.from_preset("base")
    assert (cfg.norm, cfg.positions, cfg.activation) == ("post", "sinusoidal", "relu")
    assert cfg.shared_vocab and cfg.tie_embeddings and cfg.scale_embeddings
    assert not cfg.embedding_norm and not cfg.output_bias
    assert cfg.attention_dropout == 0.0 and cfg.activation_dropout == 0.0


def test_preset_overrides_and_vocab_shorthand():
    cfg = TransformerConfig.from_preset("base", vocab_size=8000, norm="pre")
    assert (cfg.src_vocab_size, cfg.tgt_vocab_size, cfg.norm) == (8000, 8000, "pre")
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of base, big, tiny"):
        TransformerConfig.from_preset("huge")
    assert set(PRESETS) == {"base", "big", "tiny"}


def test_yaml_round_trip(tmp_path):
    cfg = TransformerConfig.from_preset("tiny", norm="pre", positions="learned", activation="gelu")
    path = tmp_path / "model.yaml"
    cfg.to_yaml(path)
    assert TransformerConfig.from_yaml(path) == cfg
    assert TransformerConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_modle=512), "unknown model key 'd_modle'; allowed keys: activation, "),
        (
            dict(d_model=100, n_heads=8),
            r"d_model \(100\) must be divisible by n_heads \(8\); allowed n_heads for this d_model: 1, 2, 4, 5, 10, 20, 25, 50",
        ),
        (dict(d_model=0), "d_model must be a positive integer, got 0"),
        (dict(d_ff=-4), "d_ff must be a positive integer, got -4"),
        (dict(src_vocab_size=0), "src_vocab_size must be a positive integer"),
        (dict(max_len=0), "max_len must be a positive integer"),
        (dict(n_encoder_layers=-1), "n_encoder_layers must be >= 0"),
        (dict(n_encoder_layers=0, n_decoder_layers=0), "both 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(norm="middle"), "model.norm must be one of 'post', 'pre', got 'middle'"),
        (dict(positions="rotary"), "model.positions must be one of 'sinusoidal', 'learned'"),
        (dict(activation="tanh"), "model.activation must be one of 'relu', 'gelu', 'silu'"),
        (dict(attention="flash"), "model.attention must be one of 'sdpa', 'reference'"),
        (dict(d_model="512"), "model.d_model must be an integer, got '512'"),
        (dict(n_heads=2.0), "model.n_heads must be an integer, got 2.0"),
        (dict(shared_vocab="yes"), "model.shared_vocab must be true or false"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps must be a positive number"),
        (dict(pad_id=64), r"pad_id must be a token id in \[0, 64\), got 64"),
        (
            dict(src_vocab_size=50),
            "shared_vocab needs src_vocab_size == tgt_vocab_size, got 50 and 64",
        ),
    ],
)
def test_invalid_values_name_the_parameter_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TransformerConfig.from_preset("tiny", **overrides)


def test_separate_vocabularies_need_shared_vocab_off():
    cfg = TransformerConfig.from_preset("tiny", src_vocab_size=50, shared_vocab=False)
    assert (cfg.src_vocab_size, cfg.tgt_vocab_size) == (50, 64)


def test_integers_are_accepted_for_float_fields():
    assert TransformerConfig.from_preset("tiny", dropout=0).dropout == 0.0


@pytest.mark.parametrize(
    "text, message",
    [("d_model: [1, 2", "model is not valid YAML"), ("- 1\n- 2", "must be a YAML mapping")],
)
def test_bad_yaml(text, message):
    with pytest.raises(ConfigError, match=message):
        TransformerConfig.from_yaml(text)


def test_floats_in_exponent_notation_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML reads YAML 1.1, where 1e-9 (no dot) is a string: a config or an override
    `--train.lr_scale 1e-9` was refused as "must be a number". Where a string belongs, the
    same text stays a string."""
    from aiayn.experiment import Experiment

    path = tmp_path / "exp.yaml"
    path.write_text(
        "task: translation\nrun_dir: runs/x\nmodel: {layer_norm_eps: 1e-5}\n"
        "train: {lr_scale: 2E-1}\n",
        encoding="utf-8",
    )
    exp = Experiment.from_yaml(path, ["--train.weight_decay", "1e-9", "--train.adam_eps=1E-7"])
    assert exp.model_config(vocab_size=16, pad_id=0).layer_norm_eps == 1e-5
    assert exp.train.lr_scale == 0.2 and exp.train.weight_decay == 1e-9
    assert exp.train.adam_eps == 1e-7
    with pytest.raises(ConfigError, match="adam_eps > 0"):  # a number, out of range
        Experiment.from_yaml(path, ["--train.adam_eps", "-1e-8"])
    with pytest.raises(ConfigError, match="must be a number, got '1e'"):
        Experiment.from_yaml(path, ["--train.lr_scale", "1e"])
    assert Experiment.from_yaml(path, ["--run_dir", "1e3"]).run_dir.name == "1e3"
    assert Experiment.from_yaml(path, ["--train.lr_scale", "1_0e-3"]).train.lr_scale == 0.01
    with pytest.raises(ConfigError, match="must be a number"):
        Experiment.from_yaml(path, ["--train.lr_scale", "1e-3x"])
