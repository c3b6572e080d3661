"""Fine-tuning a translation or summarization model from a pre-trained encoder-decoder (T5's
recipe): every weight and the tokenizer come from the source, a run resumes without it,
freezing holds, and sources of another shape are refused. (A classifier's fine-tuning is in
tests/test_classification.py.)"""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_pretrain import CONFIGS, TINY

from aiayn import checkpoint as ckpt
from aiayn.cli import main
from aiayn.errors import ConfigError
from aiayn.finetune import load_source, seq2seq_config, seq2seq_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pretrain(objective: str, run_dir: Path, toy_corpus) -> Path:
    """A tiny pre-training run (1 + 1 layers where it has both) on the toy corpus' text,
    both sides, through the CLI."""
    sources = [{"path": str(toy_corpus[name])} for name in ("train_src", "train_tgt")]
    argv = ["train", CONFIGS[objective], "--quiet", "--run_dir", run_dir,
            "--data.sources", yaml.safe_dump(sources, default_flow_style=True).strip(),
            "--train.max_steps", 8, "--model.max_len", 64, *TINY]  # fmt: skip
    if objective == "denoise":
        argv += ["--model.n_encoder_layers", 1, "--model.n_decoder_layers", 1]
    assert main([str(a) for a in argv]) == 0
    return run_dir


@pytest.fixture(scope="module")
def denoised(tmp_path_factory, toy_corpus):
    """A span-corruption run, the source of the tests below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain("denoise", tmp_path_factory.mktemp("denoise") / "run", toy_corpus)
    finally:
        torch.set_num_threads(threads)


def tuning_config(toy_config, path: Path, run_dir: Path, finetune=None, **sections) -> Path:
    """The toy translation config with only dropout in its model section (the architecture
    comes from the source), and a `finetune` section if given."""
    config = toy_config(path, run_dir, **sections)
    values = yaml.safe_load(config.read_text())
    values["model"] = {"dropout": 0.2}
    if finetune:
        values["finetune"] = finetune
    config.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return config


def test_every_weight_comes_from_the_source(denoised):
    source = load_source(denoised)
    cfg = seq2seq_config(source, {"dropout": 0.2})
    assert cfg.dropout == 0.2
    assert cfg.replace(dropout=source.model_cfg.dropout) == source.model_cfg
    state = seq2seq_model(source, cfg).state_dict()
    assert state.keys() == source.state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, source.state[name]), name


def test_translation_finetuned_from_a_denoising_run_resumes_without_it(
    denoised, toy_config, tmp_path, capsys
):
    """The run takes the source's tokenizer and architecture; resumed after the source has
    moved away (and its own tokenizer.json with it: each checkpoint holds one), it ends with
    the weights of a run never interrupted (its frozen layer frozen again); it translates."""
    source = tmp_path / "source"
    shutil.copytree(denoised, source)

    def tune(name: str, steps: int, *extra: str) -> Path:
        run_dir = tmp_path / name
        config = tuning_config(toy_config, tmp_path / f"{name}.yaml", run_dir,
                               finetune={"freeze_layers": 1},
                               train={"max_steps": steps, "eval_every": 2})  # fmt: skip
        code, _, err = run(["finetune", "--from", source, config, "--quiet", *extra], capsys)
        assert code == 0, err
        return run_dir

    straight = tune("straight", 6)
    tune("resumed", 4)
    shutil.rmtree(source)
    (tmp_path / "resumed" / "tokenizer.json").unlink()  # the checkpoint's copy serves
    resumed = tune("resumed", 6, "--resume")
    assert (resumed / "tokenizer.json").read_bytes() == (denoised / "tokenizer.json").read_bytes()
    assert (straight / "tokenizer.json").read_bytes() == (denoised / "tokenizer.json").read_bytes()
    model = yaml.safe_load((straight / "config.yaml").read_text())["model"]
    pretrained = yaml.safe_load((denoised / "config.yaml").read_text())["model"]
    assert model == {**pretrained, "dropout": 0.2}
    final = [ckpt.latest_checkpoint(d / "checkpoints") for d in (straight, resumed)]
    assert [p.name for p in final] == ["step_00000006"] * 2
    first, second = (ckpt.load_model_state_dict(p) for p in final)
    for name, value in first.items():
        assert torch.equal(second[name], value), name
    sentences = tmp_path / "in.txt"
    sentences.write_text("ein hund\n", encoding="utf-8")
    code, out, err = run(
        ["translate", "--checkpoint", straight, "--input", sentences, "--quiet"], capsys
    )
    assert code == 0 and len(out.splitlines()) == 1, err


def test_frozen_embeddings_and_first_layer_keep_the_sources_weights(
    denoised, toy_config, tmp_path, capsys
):
    run_dir = tmp_path / "frozen"
    config = tuning_config(
        toy_config, tmp_path / "frozen.yaml", run_dir,
        finetune={"freeze_embeddings": True, "freeze_layers": 1}, train={"max_steps": 4},
    )  # fmt: skip
    code, _, err = run(["finetune", "--from", denoised, config, "--quiet"], capsys)
    assert code == 0, err
    before = load_source(denoised).state
    after = ckpt.load_model_state_dict(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    kept = [n for n in after if n.startswith(("src_embed.", "encoder.layers.0."))]
    assert kept and all(torch.equal(after[n], before[n]) for n in kept)
    trained = [n for n in after if n.startswith("decoder.layers.0.")]
    assert any(not torch.equal(after[n], before[n]) for n in trained)


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("mlm", [], "holds an encoder-only model: a sequence-to-sequence task starts from an "
                    "encoder-decoder"),
        ("causal", [], "holds a decoder-only model"),
        ("denoise", ["--finetune.body_lr_scale", "0.5"],
         "finetune.body_lr_scale is 0.5, but a sequence-to-sequence model has no new head"),
        ("denoise", ["--model.d_model", "64"], "model.d_model is 64 here but the source gives 32"),
        ("denoise", ["--finetune.freeze_layers", "5"],
         "finetune.freeze_layers is 5 but the model has 1 encoder layers"),
    ],
)  # fmt: skip
def test_bad_sources_and_settings_are_one_line_and_write_nothing(
    source, extra, message, denoised, toy_corpus, toy_config, tmp_path, capsys
):
    source_dir = (
        denoised if source == "denoise" else pretrain(source, tmp_path / source, toy_corpus)
    )
    capsys.readouterr()  # what the pre-training printed
    run_dir = tmp_path / "tuned"
    config = tuning_config(toy_config, tmp_path / "tuned.yaml", run_dir)
    code, out, err = run(["finetune", "--from", source_dir, config, "--quiet", *extra], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: ") and message in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--finetune.freeze_layers", "0"],
         "--resume: finetune.freeze_layers is 0 here but 1 in"),
        (["--model.dropout", "0.5"], "--resume: model.dropout is 0.5 here but 0.2 in"),
        (["--finetune.source", "null", "--finetune.freeze_layers", "0"],
         "was fine-tuned from"),  # a plain `aiayn train CONFIG --resume`
    ],
)  # fmt: skip
def test_a_resume_that_changes_the_fine_tuning_is_refused(
    change, message, denoised, toy_config, tmp_path, capsys
):
    run_dir = tmp_path / "tuned"
    config = tuning_config(toy_config, tmp_path / "tuned.yaml", run_dir,
                           finetune={"freeze_layers": 1, "source": str(denoised)},
                           train={"max_steps": 2})  # fmt: skip
    code, _, err = run(["train", config, "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run(["train", config, "--quiet", "--resume", *change], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: ") and message in err, err


def test_a_finetuning_run_resumes_from_its_own_config_record(
    denoised, toy_config, tmp_path, capsys
):
    """RUN/config.yaml names the source and repeats its architecture: it resumes the run."""
    run_dir = tmp_path / "tuned"
    config = tuning_config(toy_config, tmp_path / "tuned.yaml", run_dir,
                           finetune={"source": str(denoised)}, train={"max_steps": 2})  # fmt: skip
    code, _, err = run(["train", config, "--quiet"], capsys)
    assert code == 0, err
    record = run_dir / "config.yaml"
    assert yaml.safe_load(record.read_text())["model"]["d_model"] == 32
    code, _, err = run(["train", record, "--quiet", "--resume", "--train.max_steps", 4], capsys)
    assert code == 0, err
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"


@pytest.mark.parametrize("record", ["kept", "edited", "removed"])
def test_a_resume_cannot_change_the_architecture_of_a_finetuning_run(
    record, denoised, toy_config, tmp_path, capsys
):
    """The run's checkpoint says what its weights are: a changed activation (no tensor's shape
    shows it) is refused whether given on the command line with no config.yaml left to
    compare, or written into config.yaml and resumed from it."""
    run_dir = tmp_path / "tuned"
    config = tuning_config(toy_config, tmp_path / "tuned.yaml", run_dir,
                           finetune={"source": str(denoised)}, train={"max_steps": 2})  # fmt: skip
    code, _, err = run(["train", config, "--quiet"], capsys)
    assert code == 0, err
    record_file = run_dir / "config.yaml"
    argv = ["train", record_file if record == "edited" else config, "--quiet", "--resume"]
    if record == "edited":
        text = record_file.read_text()
        record_file.write_text(text.replace("activation: relu", "activation: gelu"))
    else:
        if record == "removed":
            record_file.unlink()
        argv += ["--model.activation", "gelu"]
    code, out, err = run([*argv, "--train.max_steps", 4], capsys)
    assert code == 1 and err.count("\n") == 1, err
    expected = "--resume: model.activation" if record == "kept" else "model.activation is 'gelu'"
    assert expected in err, err
    if record != "kept":
        assert "step_00000002/config.json gives 'relu'" in err, err
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step_00000002"


def test_repeated_architecture_values_are_read_as_the_config_reads_them(denoised):
    """YAML reads 1e-5 as a string; the config reads it as the number; the attention kernel may
    change; a classifier may repeat its encoder-decoder source's decoder depth."""
    from aiayn.finetune import encoder_config

    source = load_source(denoised)
    section = {"layer_norm_eps": "1e-5", "d_model": 32, "attention": "reference"}
    cfg = seq2seq_config(source, section)
    assert cfg.attention == "reference" and cfg == source.model_cfg.replace(attention="reference")
    own = source.model_cfg.to_dict()
    assert encoder_config(source, own).n_decoder_layers == 0
    with pytest.raises(
        ConfigError, match="model.n_decoder_layers is 3 here but the source gives 0"
    ):
        encoder_config(source, {**own, "n_decoder_layers": 3})


def test_summaries_longer_than_the_sources_positions_are_refused_before_anything_is_written(
    denoised, toy_corpus, tmp_path, capsys
):
    """The source's max_len (64), not the default model's (512), bounds data.max_src_len."""
    table = tmp_path / "pairs.tsv"
    src = toy_corpus["train_src"].read_text().splitlines()
    tgt = toy_corpus["train_tgt"].read_text().splitlines()
    rows = "".join(f"{a}\t{b}\n" for a, b in zip(src, tgt, strict=True))
    table.write_text("document\tsummary\n" + rows)
    config = tmp_path / "sum.yaml"
    values = {
        "task": "summarization", "run_dir": str(tmp_path / "sum"), "model": {"dropout": 0.2},
        "data": {"format": "table", "train_file": str(table), "valid_file": str(table),
                 "test_file": str(table), "max_src_len": 100, "max_tgt_len": 16},
        "train": {"max_steps": 2, "max_tokens": 256, "device": "cpu"},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(values), encoding="utf-8")
    code, out, err = run(["finetune", "--from", denoised, config, "--quiet"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "data.max_src_len (100) must be below the source model's max_len (64)" in err, err
    assert not (tmp_path / "sum").exists()
    values["data"]["max_src_len"] = 48
    config.write_text(yaml.safe_dump(values), encoding="utf-8")
    code, out, err = run(["finetune", "--from", denoised, config, "--quiet"], capsys)
    assert code == 0, err
