"""The `aiayn` command end to end: train a few steps on Multi30k, translate, evaluate, average, resume;
and every bad input gives one clear line and a non-zero exit."""

import argparse
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aiayn.cli import build_parser, main
from aiayn.errors import ConfigError
from aiayn.experiment import TASKS, Experiment, apply_overrides

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
needs_multi30k = pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs ../shared/data/multi30k")

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys, stdin: bytes | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


TINY = [
    "--model.d_model", "32", "--model.d_ff", "64", "--model.n_heads", "2",
    "--model.n_encoder_layers", "1", "--model.n_decoder_layers", "1",
    "--data.vocab_size", "300", "--data.max_train_examples", "300", "--data.max_valid_examples", "20",
    "--train.max_tokens", "512", "--train.eval_every", "4", "--train.save_every", "4", "--train.log_every", "2",
    "--train.warmup_steps", "4",
]  # fmt: skip


def train_args(run_dir, steps):
    return ["train", ROOT / "configs" / "multi30k_de_en.yaml", "--quiet", "--data.root", MULTI30K,
            "--run_dir", run_dir, "--train.max_steps", steps, *TINY]  # fmt: skip


# --------------------------------------------------------------------------- happy paths


def test_help_of_every_command(capsys):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    commands = sorted(subparsers.choices)  # every subcommand the parser has, a new one too
    assert {"demo", "train", "translate", "generate", "classify"} <= set(commands)
    for command in [[], *([c] for c in commands)]:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: aiayn" in capsys.readouterr().out


def test_info_prints_the_base_parameter_count(capsys):
    code, out, _ = run(["info", "--preset", "base", "--vocab-size", "37000"], capsys)
    assert code == 0
    assert "63,082,496 (63.1M)" in out
    assert "N=6+6 d_model=512 d_ff=2048 h=8 d_k=64 P_drop=0.1" in out
    code, out, _ = run(["info", "--preset", "big", "--vocab-size", "37000"], capsys)
    assert "214,245,376 (214.2M)" in out
    assert "Table 3 of the paper gives 213M for big" in out
    # Counted on the meta device: a vocabulary of 10^11 needs no 200 TB of memory.
    code, out, _ = run(["info", "--vocab-size", "100000000000"], capsys)
    assert code == 0 and "embeddings 51,200,000,000,000 | encoder 18,914,304" in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """Every YAML in configs/ parses, and each of its sections is valid for its task."""
    from aiayn.tasks.classification import ClassificationData, HeadConfig
    from aiayn.tasks.pretrain import PretrainData
    from aiayn.tasks.summarization import SummarizationData
    from aiayn.tasks.translation import DecodeConfig, TranslationData

    # A fine-tuning config takes its architecture from the source `aiayn finetune --from` names.
    finetunes = "finetune" in yaml.safe_load(path.read_text(encoding="utf-8"))
    exp = Experiment.from_yaml(path, ["--finetune.source", "SOURCE"] if finetunes else [])
    assert exp.task in TASKS
    data_section = {
        "translation": TranslationData,
        "summarization": SummarizationData,
        "classification": ClassificationData,
        "pretrain": PretrainData,
    }[exp.task]
    data_section.from_dict(exp.data)  # unknown keys and bad values raise ConfigError
    if exp.task in ("translation", "summarization"):
        DecodeConfig.from_dict(exp.decode)
    if exp.task == "classification":
        HeadConfig.from_dict(exp.head)
    if not finetunes:
        exp.model_config(vocab_size=1000, pad_id=0)


@needs_multi30k
def test_train_translate_evaluate_average_resume(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    code, out, err = run(train_args(run_dir, 8), capsys)
    assert code == 0, err
    assert out.startswith(f"finished {run_dir}: val_loss ")
    for name in ("config.yaml", "tokenizer.json", "train.jsonl", "curves.png"):
        assert (run_dir / name).is_file(), name
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_00000004", "step_00000008"]

    code, out, err = run(["translate", "--checkpoint", run_dir, "--beam-size", "2"], capsys,
                         stdin="Ein Mann fährt Fahrrad.\nZwei Hunde spielen im Schnee.\n".encode(),
                         monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    assert len(out.splitlines()) == 2
    # The reference search instead of the fixed-shape one (a GPU-only path): the same outputs.
    code, again, err = run(["translate", "--checkpoint", run_dir, "--beam-size", "2",
                            "--no-cuda-graphs"], capsys,
                           stdin="Ein Mann fährt Fahrrad.\nZwei Hunde spielen im Schnee.\n".encode(),
                           monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0 and again == out, err
    from aiayn.cli import _translator

    options = dict(checkpoint=run_dir, beam_size=None, length_penalty=None, device="cpu")
    for flag in (False, True):
        translator = _translator(argparse.Namespace(**options, no_cuda_graphs=flag))
        assert translator.decode.cuda_graphs is not flag

    attention = tmp_path / "attention.png"
    code, _, err = run(["translate", "--checkpoint", run_dir, "--attention", attention], capsys,
                       stdin=b"Ein Mann.\n", monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err
    assert attention.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    src, ref = tmp_path / "src.de", tmp_path / "ref.en"
    with gzip.open(MULTI30K / "test_2016_flickr.de.gz", "rt") as f:
        src.write_text("".join(f.readlines()[:10]))
    with gzip.open(MULTI30K / "test_2016_flickr.en.gz", "rt") as f:
        ref.write_text("".join(f.readlines()[:10]))
    hyps = tmp_path / "hyps.en"
    code, out, err = run(["evaluate", "--checkpoint", run_dir, "--src", src, "--ref", ref, "--beam-size", "1",
                          "--output", hyps], capsys)  # fmt: skip
    assert code == 0, err
    assert out.startswith("BLEU ") and "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in out
    assert len(hyps.read_text().splitlines()) == 10
    # --ref again: both references count (it was the last one alone).
    code, out, err = run(["evaluate", "--checkpoint", run_dir, "--src", src, "--ref", ref,
                          "--ref", hyps, "--beam-size", "1", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    scores = json.loads(out)
    assert "nrefs:2" in scores["signature"] and scores["references"] == 2
    assert scores["bleu"] == pytest.approx(100.0)  # the hypotheses are one reference

    averaged = tmp_path / "averaged"
    code, out, err = run(
        ["average", "--run-dir", run_dir, "--last", "2", "--output", averaged], capsys
    )
    assert code == 0, err
    assert "averaged 2 checkpoints (step_00000004, step_00000008)" in out
    code, out, err = run(["translate", "--checkpoint", averaged], capsys, stdin=b"Ein Hund.\n",
                         monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0, err

    code, out, err = run(train_args(run_dir, 12) + ["--resume"], capsys)
    assert code == 0, err
    assert (run_dir / "checkpoints" / "step_00000012").is_dir()


def test_inference_commands_use_a_visible_gpu_by_default(monkeypatch):
    """--device auto (the default of translate, evaluate, summarize and classify) is a CUDA
    GPU where one is visible, as training's device: auto; else the CPU."""
    import torch

    from aiayn.cli import _device, build_parser

    for command in (["translate"], ["evaluate", "--src", "s", "--ref", "r"], ["classify"]):
        args = build_parser().parse_args([*command, "--checkpoint", "run"])
        assert args.device == "auto", command
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device("auto") == "cpu" and _device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device("auto") == "cuda" and _device("cpu") == "cpu"


# --------------------------------------------------------------------------- bad input


def test_errors_are_one_line_without_traceback_in_a_real_process(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("task: translation\nrun_dir: x\nmodel: {d_modle: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "aiayn.cli", "train", str(config)],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: unknown model key 'd_modle'; allowed keys: "
        + proc.stderr.split("allowed keys: ")[1].strip()
    ]
    assert "Traceback" not in proc.stderr


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "config, message",
    [
        ("task: translation\nrun_dir: r\ntrain: {max_stepz: 3}\n", "unknown train key 'max_stepz'"),
        ("task: translation\nrun_dir: r\nmodel: {d_model: 100, n_heads: 8}\n", "d_model (100) must be divisible by n_heads (8)"),
        ("task: translation\nrun_dir: r\nmodel: {d_model: -4}\n", "d_model must be a positive integer, got -4"),
        ("task: translation\nrun_dir: r\ntrain: {max_tokens: lots}\n", "train.max_tokens must be an integer, got 'lots'"),
        ("task: poetry\nrun_dir: r\n", "task must be one of translation, classification, summarization, pretrain, got 'poetry'"),
        ("task: translation\nrun_dir: r\nextra: 1\n", "unknown config section 'extra'"),
        ("task: translation\nrun_dir: r\nmodel: [1, 2]\n", "model must be a mapping"),
        ("task: translation\nrun_dir: r\nmodel: {d_model: 3\n", "is not valid YAML"),
        ("task: translation\nrun_dir: r\ndata: {format: text}\n", "data.train_src is required when data.format is 'text'"),
        ("task: translation\nrun_dir: r\ntrain: {lr_scale: .nan}\n", "train.lr_scale must be a finite number, got nan"),
        ("task: translation\nrun_dir: r\ntrain: {lr_scale: .inf}\n", "train.lr_scale must be a finite number, got inf"),
        ("task: translation\nrun_dir: r\nmodel: {dropout: -.inf}\n", "model.dropout must be a finite number, got -inf"),
        ("", "is empty; see configs/ for examples"),
    ],
)  # fmt: skip
def test_bad_configs(tmp_path, capsys, config, message):
    code, out, err = run(["train", write(tmp_path / "c.yaml", config), "--quiet"], capsys)
    assert code == 1
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_config_and_bad_override(tmp_path, capsys):
    code, _, err = run(["train", tmp_path / "nope.yaml"], capsys)
    assert code == 1 and "config file" in err and "does not exist" in err
    code, _, err = run(["train", tmp_path], capsys)
    assert code == 1 and f"error: {tmp_path} is a folder; give a config file" in err
    config = write(tmp_path / "c.yaml", "task: translation\nrun_dir: r\n")
    code, _, err = run(["train", config, "--train.max_steps"], capsys)
    assert code == 1 and "override --train.max_steps has no value" in err
    # The flag without a value is named, not the next override's value.
    code, _, err = run(["train", config, "--train.max_steps", "--data.root", "/x"], capsys)
    assert code == 1 and "override --train.max_steps has no value" in err
    code, _, err = run(["train", config, "--run_dir", "x", "train.max_steps=3"], capsys)
    assert code == 1 and "got 'train.max_steps=3'" in err
    code, _, err = run(["train", config, "--nosuch.key", "3"], capsys)
    assert code == 1 and "unknown config section 'nosuch'" in err


def text_config(tmp_path, src_lines, tgt_lines, src_bytes=None):
    src = tmp_path / "train.de"
    if src_bytes is not None:
        src.write_bytes(src_bytes)
    else:
        write(src, "".join(line + "\n" for line in src_lines))
    tgt = write(tmp_path / "train.en", "".join(line + "\n" for line in tgt_lines))
    body = (f"task: translation\nrun_dir: {tmp_path / 'run'}\n"
            f"data: {{format: text, train_src: {src}, train_tgt: {tgt}, valid_src: {src}, valid_tgt: {tgt}}}\n")  # fmt: skip
    return write(tmp_path / "c.yaml", body)


def test_parallel_files_with_different_line_counts(tmp_path, capsys):
    config = text_config(tmp_path, ["a", "b", "c"], ["x", "y"])
    code, _, err = run(["train", config, "--quiet"], capsys)
    assert code == 1 and "3" in err and "2" in err and "train.de" in err and "train.en" in err


def test_non_utf8_training_file(tmp_path, capsys):
    config = text_config(tmp_path, None, ["x", "y"], src_bytes=b"gut\n\xff\xfe kaputt\n")
    code, _, err = run(["train", config, "--quiet"], capsys)
    assert code == 1 and "train.de:2" in err and "UTF-8" in err


def test_empty_training_file(tmp_path, capsys):
    config = text_config(tmp_path, [], ["x"])
    code, _, err = run(["train", config, "--quiet"], capsys)
    assert code == 1 and "train.de" in err


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", f"task: translation\nrun_dir: {tmp_path / 'run'}\n")
    code, _, err = run(["train", config, "--resume", "--quiet"], capsys)
    assert code == 1 and "has no checkpoint to resume; start without --resume" in err


def test_translate_with_a_missing_checkpoint(tmp_path, capsys):
    code, _, err = run(["translate", "--checkpoint", tmp_path / "none"], capsys)
    assert code == 1 and "does not exist" in err


@needs_multi30k
def test_bad_input_to_a_trained_model(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert run(train_args(run_dir, 2), capsys)[0] == 0
    # Starting again on the same run_dir would overwrite it: refused.
    code, _, err = run(train_args(run_dir, 2), capsys)
    assert code == 1 and "already holds a run: continue it with --resume" in err
    # Empty and binary stdin.
    code, _, err = run(
        ["translate", "--checkpoint", run_dir], capsys, stdin=b"", monkeypatch=monkeypatch
    )
    assert code == 1 and "no input sentences" in err
    code, _, err = run(
        ["translate", "--checkpoint", run_dir],
        capsys,
        stdin=b"\x89PNG\xff\x00",
        monkeypatch=monkeypatch,
    )
    assert code == 1 and "not UTF-8" in err
    # An output path that cannot be written: nothing else is touched.
    code, _, err = run(["translate", "--checkpoint", run_dir, "--output", tmp_path / "no" / "such" / "out.txt"],
                       capsys, stdin=b"Hallo.\n", monkeypatch=monkeypatch)  # fmt: skip
    assert code == 1 and "cannot write" in err
    # A tokenizer from another vocabulary.
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    from aiayn.data.tokenizer import Tokenizer

    Tokenizer.train(["ein ganz anderes Vokabular"] * 5, vocab_size=40, min_frequency=1).save(
        checkpoint / "tokenizer.json"
    )
    code, _, err = run(
        ["translate", "--checkpoint", checkpoint],
        capsys,
        stdin=b"Hallo.\n",
        monkeypatch=monkeypatch,
    )
    assert code == 1 and "belongs to another run" in err
    # A truncated weights file.
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run(
        ["translate", "--checkpoint", checkpoint],
        capsys,
        stdin=b"Hallo.\n",
        monkeypatch=monkeypatch,
    )
    assert code == 1 and "model.safetensors" in err


def test_an_override_that_opens_a_yaml_list_must_close_it():
    with pytest.raises(ConfigError, match=r"--data.sources: '\[\{path: x' is not valid YAML"):
        apply_overrides({}, ["--data.sources", "[{path: x"])
    values: dict = {}
    apply_overrides(values, ["--data.root", "a: b: c"])  # not YAML: taken as text
    assert values == {"data": {"root": "a: b: c"}}


def test_overrides_may_be_written_with_an_equals_sign():
    values: dict = {"train": {"max_steps": 8}}
    apply_overrides(values, ["--train.max_steps=3", "--run_dir=runs/a=b", "--data.root", "d"])
    assert values == {"train": {"max_steps": 3}, "run_dir": "runs/a=b", "data": {"root": "d"}}
