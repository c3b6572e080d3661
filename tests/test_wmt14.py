"""configs/wmt14_en_de.yaml, the paper's experiment: its model is the paper's base size, and
the config runs as written (data from the Hugging Face hub, here a stand-in `datasets` module
with WMT 2014's record layout), at a tiny size, through training, averaging and evaluation."""

import sys
import types
from pathlib import Path

import torch
import yaml

from aiayn.cli import main
from aiayn.experiment import Experiment
from aiayn.model import Transformer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "wmt14_en_de.yaml"
TINY = ["--model.d_model", "32", "--model.d_ff", "64", "--model.n_heads", "2",
        "--model.n_encoder_layers", "1", "--model.n_decoder_layers", "1",
        "--data.vocab_size", "120", "--data.min_frequency", "1",
        "--train.max_steps", "6", "--train.max_tokens", "256", "--train.warmup_steps", "2",
        "--train.eval_every", "3", "--train.save_every", "2", "--train.log_every", "1",
        "--train.device", "cpu"]  # fmt: skip


def test_the_model_is_the_papers_base_model():
    """Table 3's base row: d_model 512, 8 heads, d_ff 2048, N = 6, P_drop 0.1; with a shared
    37,000-token vocabulary, 63.1M parameters (the paper rounds its own count to 65M)."""
    exp = Experiment.from_yaml(CONFIG)
    cfg = exp.model_config(vocab_size=exp.data["vocab_size"], pad_id=0)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout) == (512, 8, 2048, 0.1)
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == (6, 6)
    assert cfg.shared_vocab and cfg.tie_embeddings and cfg.src_vocab_size == 37000
    with torch.device("meta"):
        assert Transformer(cfg).num_parameters() == 63_082_496


def test_the_config_trains_averages_and_evaluates(one_thread, monkeypatch, tmp_path, capsys):
    words = "the a house cat dog sees small big red runs".split()
    german = dict(
        zip(words, "das ein haus katze hund sieht klein gross rot rennt".split(), strict=True)
    )
    rows = [[words[(i * 7 + k * 3) % len(words)] for k in range(2 + i % 5)] for i in range(240)]
    records = [{"translation": {"en": " ".join(r), "de": " ".join(german[w] for w in r)}}
               for r in rows]  # fmt: skip
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"train": records[:200], "validation": records[200:]}[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    run_dir = tmp_path / "wmt"
    assert main(["train", str(CONFIG), "--quiet", "--run_dir", str(run_dir), *TINY]) == 0
    assert calls == [("wmt/wmt14", "de-en", "train"), ("wmt/wmt14", "de-en", "validation")]
    averaged = tmp_path / "averaged"
    argv = ["average", "--quiet", "--run-dir", run_dir, "--last", 3, "--output", averaged]
    assert main([str(a) for a in argv]) == 0
    src, ref = tmp_path / "test.en", tmp_path / "test.de"
    src.write_text("".join(r["translation"]["en"] + "\n" for r in records[200:]), "utf-8")
    ref.write_text("".join(r["translation"]["de"] + "\n" for r in records[200:]), "utf-8")
    capsys.readouterr()
    argv = ["evaluate", "--quiet", "--checkpoint", averaged, "--src", src, "--ref", ref, "--json"]
    assert main([str(a) for a in argv]) == 0
    scores = yaml.safe_load(capsys.readouterr().out)  # JSON is YAML
    assert 0 <= scores["bleu"] <= 100 and scores["sentences"] == 40


def test_without_the_datasets_package_the_run_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # the import fails
    code = main(["train", str(CONFIG), "--quiet", "--run_dir", "/nonexistent/wmt", *TINY])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "pip install datasets" in err, err
