"""Bad input to every command: one line, `error: <what is wrong and what to do>`, exit 1, no
traceback (unless --debug), and nothing written or overwritten.

These are the cases tests/test_cli.py does not already cover; docs/reliability.md lists both.
The commands run in-process through `aiayn.cli.main` (fast); pytest's log capture keeps log
lines off stderr, so stderr holds exactly what the command printed.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from aiayn import checkpoint as ckpt
from aiayn.cli import main
from aiayn.config import TransformerConfig
from aiayn.data.tokenizer import Tokenizer
from aiayn.errors import ConfigError
from aiayn.experiment import Experiment
from aiayn.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

Result = tuple[int, str, str]


def run(
    argv: list[object],
    capsys: pytest.CaptureFixture[str],
    stdin: bytes | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> Result:
    """Run `aiayn argv` in-process; returns (exit status, stdout, stderr)."""
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: Result, *fragments: str) -> str:
    """Exit 1 and exactly one stderr line, `error: ...`, holding every fragment; returns it."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 1, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots prove nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, toy_config: Callable[..., Path]) -> Path:
    """A finished toy run (2 steps, one checkpoint): the run directory. Tests must not change it."""
    folder = tmp_path_factory.mktemp("trained")
    config = toy_config(
        folder / "toy.yaml",
        folder / "run",
        train={"max_steps": 2, "eval_every": 0, "save_every": 0},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(config), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "run"


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run that a test may damage; its config is beside it (toy.yaml)."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    shutil.copy(trained.parent / "toy.yaml", tmp_path / "toy.yaml")
    return copy


def checkpoint_of(run_dir: Path) -> Path:
    found = ckpt.latest_checkpoint(run_dir)
    assert found is not None
    return found


# --------------------------------------------------------------------------- train: data files


def data_config(tmp_path: Path, toy_config: Callable[..., Path], **data: object) -> Path:
    """The toy config with some data settings changed."""
    return toy_config(tmp_path / "c.yaml", tmp_path / "run", data=data)


def assert_train_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: Path, *fragments: str
) -> str:
    """A refused `train`: the one-line error, and no run directory was created."""
    line = assert_refused(run(["train", config, "--quiet"], capsys), *fragments)
    assert not (tmp_path / "run").exists()
    return line


def test_table_without_the_configured_column(tmp_path, capsys, toy_config):
    table = tmp_path / "train.tsv"
    table.write_text("src\ttarget\nein hund\thund ein\n", encoding="utf-8")
    config = data_config(
        tmp_path, toy_config, format="table", train_file=str(table), valid_file=str(table)
    )
    assert_train_refused(
        tmp_path, capsys, config, "train.tsv: no column 'source'; available: 'src', 'target'"
    )


def test_table_row_with_a_stray_delimiter(tmp_path, capsys, toy_config):
    table = tmp_path / "train.tsv"
    table.write_text("source\ttarget\na\tb\na\tb\tc\n", encoding="utf-8")
    config = data_config(
        tmp_path, toy_config, format="table", train_file=str(table), valid_file=str(table)
    )
    assert_train_refused(tmp_path, capsys, config, "train.tsv:3: 3 fields but the header has 2")


def test_jsonl_line_that_is_not_json(tmp_path, capsys, toy_config):
    table = tmp_path / "train.jsonl"
    table.write_text('{"source": "a", "target": "b"}\n{"source": "a", \n', encoding="utf-8")
    config = data_config(
        tmp_path, toy_config, format="table", train_file=str(table), valid_file=str(table)
    )
    assert_train_refused(tmp_path, capsys, config, "train.jsonl:2: not valid JSON")


def test_table_with_an_unknown_suffix(tmp_path, capsys, toy_config):
    table = tmp_path / "train.txt"
    table.write_text("source\ttarget\na\tb\n", encoding="utf-8")
    config = data_config(
        tmp_path, toy_config, format="table", train_file=str(table), valid_file=str(table)
    )
    assert_train_refused(tmp_path, capsys, config, "unknown table format; name the file with")


def test_truncated_gzip_data_file(tmp_path, capsys, toy_config, toy_corpus):
    whole = gzip.compress(toy_corpus["train_src"].read_bytes())
    broken = tmp_path / "train.src.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    config = data_config(tmp_path, toy_config, train_src=str(broken))
    assert_train_refused(tmp_path, capsys, config, "train.src.gz: cannot read", "download")


def test_data_path_that_is_a_folder(tmp_path, capsys, toy_config):
    config = data_config(tmp_path, toy_config, valid_src=str(tmp_path))
    assert_train_refused(tmp_path, capsys, config, "is a directory, not a file; check the path")


def test_validation_files_of_different_lengths(tmp_path, capsys, toy_config, toy_corpus):
    config = data_config(tmp_path, toy_config, valid_tgt=str(toy_corpus["train_tgt"]))
    assert_train_refused(
        tmp_path, capsys, config, "valid.src has 20 lines but", "train.tgt has 300", "line-aligned"
    )


def test_pairs_with_an_empty_side_are_dropped_with_a_count(tmp_path, caplog, toy_corpus):
    """As summarization does: an empty target teaches a model to stop at once."""
    from aiayn.tasks.translation import TranslationData

    lines = toy_corpus["train_tgt"].read_text(encoding="utf-8").splitlines()
    lines[3] = lines[10] = ""
    target = tmp_path / "holes.tgt"
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    data = TranslationData(format="text", train_src=str(toy_corpus["train_src"]),
                           train_tgt=str(target), valid_src=str(toy_corpus["valid_src"]),
                           valid_tgt=str(toy_corpus["valid_tgt"]))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="aiayn"):
        pairs = data.read("train")
    assert len(pairs) == 298 and all(s and t for s, t in pairs)
    assert [r.getMessage() for r in caplog.records] == [
        "train: dropped 2 of 300 pairs with an empty source or target"
    ]


def long_line_config(tmp_path, toy_config, toy_corpus, policy: str) -> Path:
    """The toy corpus with training line 18 replaced by one of 100,000 characters."""
    lines = toy_corpus["train_src"].read_text(encoding="utf-8").splitlines()
    lines[17] = ("hund " * 20_000).strip()
    source = tmp_path / "long.src"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert len(lines[17]) > 99_990
    return toy_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data={"train_src": str(source), "max_len_policy": policy},
        train={"max_steps": 2, "eval_every": 0, "save_every": 0},
    )


def test_absurdly_long_line_is_truncated_with_one_counted_warning(
    tmp_path, capsys, caplog, toy_config, toy_corpus
):
    config = long_line_config(tmp_path, toy_config, toy_corpus, "truncate")
    with caplog.at_level(logging.WARNING, logger="aiayn"):
        code, out, err = run(["train", config, "--quiet"], capsys)
    assert code == 0, err
    assert out.startswith(f"finished {tmp_path / 'run'}: val_loss ")
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warnings == ["1 of 300 training pairs were longer than max_len 64 and were truncated"]


def test_a_vocabulary_size_other_than_the_tokenizers_is_refused_and_the_runs_own_is_not(
    tmp_path, capsys, toy_config
):
    """A run's config.yaml spells out the sizes its tokenizer gave: `aiayn train RUN/config.yaml
    --resume` continues it (to the weights of an uninterrupted run); another size is refused."""
    run_dir = tmp_path / "run"
    config = toy_config(tmp_path / "toy.yaml", run_dir, train={"max_steps": 4})
    argv = ["train", config, "--quiet", "--model.src_vocab_size", 9]
    assert_refused(run(argv, capsys), "model.src_vocab_size is 9 here but the tokenizer gives")
    assert not run_dir.exists()
    assert run(["train", config, "--quiet"], capsys)[0] == 0
    record = ["train", run_dir / "config.yaml", "--quiet", "--resume", "--train.max_steps", 8]
    code, _, err = run(record, capsys)
    assert code == 0, err
    straight = tmp_path / "straight"
    assert (
        run(["train", config, "--quiet", "--run_dir", straight, "--train.max_steps", 8], capsys)[0]
        == 0
    )
    a, b = (
        ckpt.load_model_state_dict(checkpoint_of(d / "checkpoints")) for d in (run_dir, straight)
    )
    assert checkpoint_of(run_dir / "checkpoints").name == "step_00000008"
    assert all(torch.equal(a[name], b[name]) for name in b)


def test_absurdly_long_line_is_left_out_under_policy_drop(
    tmp_path, capsys, caplog, toy_config, toy_corpus
):
    config = long_line_config(tmp_path, toy_config, toy_corpus, "drop")
    with caplog.at_level(logging.WARNING, logger="aiayn"):
        code, out, err = run(["train", config, "--quiet"], capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert warnings == ["1 of 300 training pairs were longer than max_len 64 and were left out"]
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
    run_dir = tmp_path / "none_left"  # every toy pair has 2 words or more: none fits in 2 ids
    argv = ["train", config, "--quiet", "--run_dir", run_dir, "--model.max_len", "2"]
    code, out, err = run(argv, capsys)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "every training pair is longer than model.max_len 2: raise it" in err, err
    assert not run_dir.exists()


def test_absurdly_long_line_is_rejected_under_policy_reject(
    tmp_path, capsys, toy_config, toy_corpus
):
    config = long_line_config(tmp_path, toy_config, toy_corpus, "reject")
    assert_train_refused(
        tmp_path,
        capsys,
        config,
        "training example 17: source has 20000 tokens",
        "but max_len is 64",
        "model.max_len and data.max_len_policy",
    )


# --------------------------------------------------------------------------- train: the config

BASE = "task: translation\nrun_dir: r\n"


@pytest.mark.parametrize(
    "config, message",
    [
        (BASE + "data: {vocab_sise: 300}\n", "unknown data key 'vocab_sise'; allowed keys: format,"),
        (BASE + "decode: {beams: 3}\n", "unknown decode key 'beams'; allowed keys: batch_size,"),
        (BASE + "model: {d_model: '32'}\n", "model.d_model must be an integer, got '32'"),
        (BASE + "train: {max_steps: 2.5}\n", "train.max_steps must be an integer, got 2.5"),
        (BASE + "model: {norm: sideways}\n", "model.norm must be one of 'post', 'pre', got 'sideways'"),
        (BASE + "data: {max_len_policy: skip}\n", "data.max_len_policy must be one of 'truncate', 'drop', 'reject'"),
        (BASE + "model: {dropout: 1.5}\n", "dropout must be in [0, 1), got 1.5"),
        (BASE + "model: {n_heads: 0}\n", "n_heads must be a positive integer, got 0"),
        (BASE + "model: {n_encoder_layers: 0}\n", "task translation needs an encoder and a decoder"),
        (BASE + "model: {n_decoder_layers: 0}\n", "model.n_decoder_layers is 0: set both to 1 or more"),
    ],
    ids=["unknown-data-key", "unknown-decode-key", "quoted-number", "float-for-int", "bad-choice",
         "bad-policy", "dropout-1.5", "zero-heads", "no-encoder", "no-decoder"],
)  # fmt: skip
def test_bad_config_values(tmp_path, capsys, config, message):
    path = tmp_path / "c.yaml"
    path.write_text(config, encoding="utf-8")
    assert_refused(run(["train", path, "--quiet"], capsys), message)


def test_train_in_fp16_on_a_cpu(tmp_path, capsys, toy_config):
    config = toy_config(tmp_path / "c.yaml", tmp_path / "run", train={"precision": "fp16"})
    assert_train_refused(tmp_path, capsys, config, "train.precision fp16 needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_train_on_cuda_without_a_gpu(tmp_path, capsys, toy_config):
    config = toy_config(tmp_path / "c.yaml", tmp_path / "run", train={"device": "cuda"})
    assert_train_refused(tmp_path, capsys, config, "no CUDA GPU is visible; use device: cpu")


def test_run_dir_inside_a_file(tmp_path, capsys, toy_config):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder should be", encoding="utf-8")
    config = toy_config(tmp_path / "c.yaml", blocker / "run")
    assert_refused(
        run(["train", config, "--quiet"], capsys),
        f"run_dir {blocker / 'run'} cannot be created: {blocker} is a file",
        "pass --run_dir with another folder",
    )
    assert blocker.read_text(encoding="utf-8") == "a file where a folder should be"


# --------------------------------------------------------------------------- train: --resume


@pytest.mark.parametrize(
    "setting, value, was",
    [
        ("model.d_model", "48", "32"),
        ("data.vocab_size", "90", "100"),
        ("train.max_tokens", "128", "256"),
        ("train.lr_scale", "0.5", "1.0"),
    ],
)
def test_resume_with_another_setting_names_it_and_writes_nothing(
    run_copy, capsys, setting, value, was
):
    before = snapshot(run_copy)
    resume = ["train", run_copy.parent / "toy.yaml", "--run_dir", run_copy, "--resume", "--quiet"]
    assert_refused(
        run([*resume, f"--{setting}", value], capsys),
        f"--resume: {setting} is {value} here but {was} in {run_copy / 'config.yaml'}",
        "start a new run with another --run_dir",
    )
    assert snapshot(run_copy) == before


def test_resume_of_a_run_without_its_config_record_lists_the_tensors(run_copy, capsys):
    """Without config.yaml to compare with, the checkpoint's shapes still refuse the change."""
    (run_copy / "config.yaml").unlink()
    before = snapshot(run_copy)
    line = assert_refused(
        run(
            [
                "train",
                run_copy.parent / "toy.yaml",
                "--run_dir",
                run_copy,
                "--resume",
                "--quiet",
                "--model.d_model",
                "48",
            ],
            capsys,
        ),  # fmt: skip
        "does not match the model; shape mismatch: ",
        "encoder.layers.0.self_attn.w_q.weight: checkpoint (32, 32) vs model (48, 48)",
        "--resume needs the model settings and tokenizer the run was started with",
    )
    assert "... and " in line  # a long list is cut short, on one line
    assert snapshot(run_copy) == before


def test_resume_with_another_tokenizer_lists_the_embeddings_and_writes_nothing(run_copy, capsys):
    other = Tokenizer.train(["ganz anderes vokabular hier"] * 5, vocab_size=40, min_frequency=1)
    other.save(run_copy / "tokenizer.json")
    before = snapshot(run_copy)
    assert_refused(
        run(
            ["train", run_copy.parent / "toy.yaml", "--run_dir", run_copy, "--resume", "--quiet"],
            capsys,
        ),  # fmt: skip
        "src_embed.lut.weight: checkpoint (",
        f"vs model ({other.vocab_size}, 32)",
        "--resume needs the model settings and tokenizer",
    )
    assert snapshot(run_copy) == before


def test_resume_from_a_truncated_checkpoint_says_how_to_go_back_one(run_copy, capsys):
    weights = checkpoint_of(run_copy) / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(run_copy)
    assert_refused(
        run(
            ["train", run_copy.parent / "toy.yaml", "--run_dir", run_copy, "--resume", "--quiet"],
            capsys,
        ),  # fmt: skip
        f"checkpoint file {weights} is damaged",
        f"--resume takes the latest checkpoint: move {weights.parent} out of",
    )
    assert snapshot(run_copy) == before


def test_resume_with_another_seed(run_copy, capsys):
    """Compared with config.yaml first; without it, the checkpoint's own record refuses."""
    resume = ["train", run_copy.parent / "toy.yaml", "--run_dir", run_copy, "--resume"]
    for message in (
        f"--resume: train.seed is 2 here but 1 in {run_copy / 'config.yaml'}",
        "was trained with seed 1 but this run uses 2; resume with the same train.seed",
    ):
        if "config.yaml" not in message:
            (run_copy / "config.yaml").unlink()
        before = snapshot(run_copy)
        assert_refused(run([*resume, "--quiet", "--train.seed", "2"], capsys), message)
    assert snapshot(run_copy) == before


def test_resume_with_another_task_is_refused_before_any_data_is_read(run_copy):
    exp = Experiment.from_dict(
        {"task": "summarization", "run_dir": str(run_copy), "model": {"preset": "tiny"}}
    )
    with pytest.raises(ConfigError, match="holds a translation run but the config is for summ"):
        exp.check_run_dir(resume=True)


def test_resume_of_a_finished_run_names_the_limit_it_reached(run_copy, capsys):
    """The toy run ended at train.max_steps 2. Resuming it as it is would only validate and
    log step 2 again; a moved data folder (data.root) is not another experiment."""
    before = snapshot(run_copy)
    resume = ["train", run_copy.parent / "toy.yaml", "--run_dir", run_copy, "--resume", "--quiet"]
    for extra in ([], ["--data.root", run_copy.parent], ["--train.max_steps", "1"]):
        max_steps = extra[1] if extra and extra[0] == "--train.max_steps" else "2"
        assert_refused(
            run([*resume, *extra], capsys),
            f"has already reached step 2, train.max_steps {max_steps}; raise that limit",
        )
    assert snapshot(run_copy) == before


def holding(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder` as a running training does (aiayn.run_lock); it
    lets go when its stdin closes."""
    code = (
        "import sys; from pathlib import Path; from aiayn import run_lock; "
        "run_lock.hold(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_training_in_the_folder_of_a_running_one_is_refused(run_copy, capsys):
    """Two trainings in one run_dir mixed their tokenizers, configs and logs, and both ended
    "finished"; the second is refused now, started fresh or with --resume, writing nothing."""
    before = snapshot(run_copy)
    config = run_copy.parent / "toy.yaml"
    more = ["--train.max_steps", "3"]
    holder = holding(run_copy)
    try:
        for extra in ([], ["--resume", *more]):
            assert_refused(
                run(["train", config, "--run_dir", run_copy, *extra, "--quiet"], capsys),
                f"another aiayn process is training in {run_copy}: wait for it to end",
            )
        assert snapshot(run_copy) == before
        # A run that was started beside it, fresh, finds the folder taken once it has data.
        exp = Experiment.from_yaml(config, ["--run_dir", str(run_copy)])
        with pytest.raises(ConfigError, match="another aiayn process is training"):
            exp.claim_run_dir()
    finally:
        holder.communicate("")
    code, _, err = run(
        ["train", config, "--run_dir", run_copy, "--resume", *more, "--quiet"], capsys
    )
    assert code == 0, err


def test_the_python_api_lets_go_of_the_run_folder(run_copy):
    """A session that trained (or was refused) must not keep the folder from `aiayn train`."""
    from aiayn import run_lock
    from aiayn.tasks.translation import train_translation

    config = run_copy.parent / "toy.yaml"
    exp = Experiment.from_yaml(config, ["--run_dir", str(run_copy)])
    with pytest.raises(ConfigError, match="already holds a run"):
        train_translation(exp, progress=False)  # refused after taking the folder
    assert run_copy.resolve() not in run_lock._held
    exp = Experiment.from_yaml(config, ["--run_dir", str(run_copy), "--train.max_steps", "3"])
    train_translation(exp, resume=True, progress=False)
    assert run_copy.resolve() not in run_lock._held
    holding(run_copy).communicate("")  # another process takes it


def test_demo_refuses_to_replace_a_run_folder_it_did_not_write(run_copy, capsys):
    """The demo replaces --out's run/ folder: only a demo's, not a training run's."""
    before = snapshot(run_copy)
    assert_refused(
        run(["demo", "--out", run_copy.parent, "--quiet"], capsys),
        f"{run_copy} holds files that no demo wrote (a training run?)",
    )
    assert snapshot(run_copy) == before


def test_demo_out_inside_a_file(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x", encoding="utf-8")
    assert_refused(
        run(["demo", "--out", blocker / "demo", "--quiet"], capsys),
        f"--out {blocker / 'demo'} cannot be a folder: {blocker} is a file",
    )


# --------------------------------------------------------------------------- translate


def test_translate_stdin_with_nul_bytes(trained, capsys, monkeypatch):
    assert_refused(
        run(["translate", "--checkpoint", trained], capsys, b"ein\x00hund\n", monkeypatch),
        "stdin holds binary data (NUL bytes): give plain text",
    )


def test_translate_an_input_file_of_blank_lines(trained, tmp_path, capsys):
    blank = tmp_path / "in.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    assert_refused(
        run(["translate", "--checkpoint", trained, "--input", blank], capsys),
        "in.txt: file is empty; point at a file with one sentence per line",
    )


def test_translate_a_missing_input_file(trained, tmp_path, capsys):
    assert_refused(
        run(["translate", "--checkpoint", trained, "--input", tmp_path / "nope.txt"], capsys),
        "nope.txt: does not exist; check the path",
    )


def test_failed_translate_leaves_an_existing_output_unchanged(
    trained, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "existing.txt"
    output.write_text("keep me\n", encoding="utf-8")
    assert_refused(
        run(
            ["translate", "--checkpoint", trained, "--output", output],
            capsys,
            b"\xff\xfe",
            monkeypatch,
        ),  # fmt: skip
        "stdin line 1 is not UTF-8 text",
    )
    assert output.read_text(encoding="utf-8") == "keep me\n"
    assert [p.name for p in tmp_path.iterdir()] == ["existing.txt"]


def test_translate_output_inside_a_file(trained, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x", encoding="utf-8")
    assert_refused(
        run(
            ["translate", "--checkpoint", trained, "--output", blocker / "out.txt"],
            capsys,
            b"ein hund\n",
            monkeypatch,
        ),  # fmt: skip
        "is a file, not a folder; create the folder or choose another --output",
    )


def test_translate_attention_into_a_missing_folder_creates_nothing(
    trained, tmp_path, capsys, monkeypatch
):
    target = tmp_path / "missing" / "attention.png"
    assert_refused(
        run(
            ["translate", "--checkpoint", trained, "--attention", target],
            capsys,
            b"ein hund\n",
            monkeypatch,
        ),  # fmt: skip
        f"{target.parent} does not exist; create the folder or choose another --attention",
    )
    assert list(tmp_path.iterdir()) == []


def test_translate_output_that_is_a_folder(trained, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    assert_refused(
        run(
            ["translate", "--checkpoint", trained, "--output", folder],
            capsys,
            b"ein hund\n",
            monkeypatch,
        ),  # fmt: skip
        f"cannot write {folder}: it is a folder; give --output a file name",
    )
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []  # no temp file


@pytest.mark.parametrize(
    "option, message",
    [
        (["--beam-size", "0"], "--beam-size must be 1 or more (1 is greedy), got 0"),
        (["--length-penalty", "-1"], "--length-penalty must be a finite number >= 0"),
        (["--length-penalty", "nan"], "--length-penalty must be a finite number >= 0"),
        (["--no-repeat-ngram", "-2"], "--no-repeat-ngram must be >= 0 (0: off), got -2"),
        (["--device", "tpu"], "--device 'tpu' is not a device; use auto, cpu or cuda"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA GPU is visible; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
    ids=[
        "beam-0",
        "negative-penalty",
        "nan-penalty",
        "negative-ngram",
        "unknown-device",
        "cuda-without-gpu",
    ],
)
def test_translate_bad_decoding_options(trained, capsys, monkeypatch, option, message):
    assert_refused(
        run(["translate", "--checkpoint", trained, *option], capsys, b"ein hund\n", monkeypatch),
        message,
    )


def test_translate_with_a_damaged_config_json(run_copy, capsys, monkeypatch):
    checkpoint = checkpoint_of(run_copy)
    (checkpoint / ckpt.CONFIG_FILE).write_text('{"model": ', encoding="utf-8")
    assert_refused(
        run(["translate", "--checkpoint", checkpoint], capsys, b"ein hund\n", monkeypatch),
        "config.json is damaged",
        "choose another checkpoint, such as an earlier one in",
    )
    # Valid JSON, but not what `aiayn train` writes: one line too, no AttributeError/KeyError.
    for text, message in (("[1, 2]", "is damaged (a JSON list, not an object)"),
                          ('{"task": "translation"}', "config.json has no model section")):  # fmt: skip
        (checkpoint / ckpt.CONFIG_FILE).write_text(text, encoding="utf-8")
        assert_refused(
            run(["translate", "--checkpoint", checkpoint], capsys, b"ein hund\n", monkeypatch),
            message,
        )


def test_translate_a_checkpoint_without_its_tokenizer(run_copy, capsys, monkeypatch):
    checkpoint = checkpoint_of(run_copy)
    (checkpoint / "tokenizer.json").unlink()
    assert_refused(
        run(["translate", "--checkpoint", checkpoint], capsys, b"ein hund\n", monkeypatch),
        "has no tokenizer.json; it was not saved by `aiayn train`: copy the tokenizer.json",
    )


def test_translate_with_a_file_as_checkpoint(tmp_path, capsys, monkeypatch):
    not_a_checkpoint = tmp_path / "model.bin"
    not_a_checkpoint.write_bytes(b"\x00" * 16)
    assert_refused(
        run(["translate", "--checkpoint", not_a_checkpoint], capsys, b"ein hund\n", monkeypatch),
        "is neither a checkpoint nor a run directory with checkpoints; pass a checkpoint folder",
    )


def test_translate_an_absurdly_long_line_cuts_it_instead_of_crashing(trained, capsys, monkeypatch):
    line = ("hund " * 20_000).strip().encode()
    code, out, err = run(
        ["translate", "--checkpoint", trained], capsys, line + b"\nein hund\n", monkeypatch
    )
    assert code == 0, err
    assert len(out.splitlines()) == 2


# --------------------------------------------------------------------------- evaluate


def test_evaluate_with_mismatched_src_and_ref(trained, tmp_path, capsys, toy_corpus):
    output = tmp_path / "hyps.txt"
    assert_refused(
        run(
            [
                "evaluate",
                "--checkpoint",
                trained,
                "--src",
                toy_corpus["train_src"],
                "--ref",
                toy_corpus["valid_tgt"],
                "--output",
                output,
            ],
            capsys,
        ),  # fmt: skip
        "train.src has 300 lines but",
        "valid.tgt has 20; parallel files must be line-aligned",
    )
    assert not output.exists()


def test_evaluate_with_a_missing_reference(trained, tmp_path, capsys, toy_corpus):
    assert_refused(
        run(
            [
                "evaluate",
                "--checkpoint",
                trained,
                "--src",
                toy_corpus["valid_src"],
                "--ref",
                tmp_path / "missing.en",
            ],
            capsys,
        ),  # fmt: skip
        "missing.en: does not exist; check the path",
    )


# --------------------------------------------------------------------------- average


def test_average_checkpoints_of_different_models(trained, tmp_path, capsys):
    other = ckpt.save_checkpoint(
        tmp_path / "other",
        model=Transformer(TransformerConfig.from_preset("tiny", vocab_size=100)),
        config={},
    )
    output = tmp_path / "avg"
    assert_refused(
        run(
            ["average", "--checkpoints", checkpoint_of(trained), other, "--output", output], capsys
        ),  # fmt: skip
        "cannot average",
        "tensor decoder.layers.1.cross_attn.w_k.bias is missing from",
        "; average checkpoints of one model",
    )
    assert not output.exists()


def test_average_an_empty_run_dir(tmp_path, capsys):
    assert_refused(
        run(["average", "--run-dir", tmp_path, "--output", tmp_path / "avg"], capsys),
        "has no checkpoints to average; pass a run that saved checkpoints",
    )
    assert list(tmp_path.iterdir()) == []


def test_average_a_missing_run_dir(tmp_path, capsys):
    assert_refused(
        run(["average", "--run-dir", tmp_path / "nope", "--output", tmp_path / "avg"], capsys),
        "is not a folder; pass the run_dir of a training run",
    )


def test_average_the_last_zero_checkpoints(trained, tmp_path, capsys):
    assert_refused(
        run(["average", "--run-dir", trained, "--last", "0", "--output", tmp_path / "avg"], capsys),
        "--last must be 1 or more (the paper averages 5), got 0",
    )
    step = checkpoint_of(trained)
    with_list = ["average", "--checkpoints", step, "--last", "1", "--output", tmp_path / "avg"]
    assert_refused(run(with_list, capsys), "--last picks from --run-dir's checkpoints")
    assert not (tmp_path / "avg").exists()


def test_average_into_a_folder_that_is_not_a_checkpoint_changes_nothing(trained, tmp_path, capsys):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("do not delete", encoding="utf-8")
    assert_refused(
        run(["average", "--run-dir", trained, "--output", precious], capsys),
        "refusing to overwrite",
        "it exists and is not a checkpoint; choose another directory or remove it",
    )
    assert snapshot(precious) == {"notes.txt": b"do not delete"}


# --------------------------------------------------------------------------- info and --debug


def test_info_with_an_unknown_preset(capsys):
    assert_refused(
        run(["info", "--preset", "huge"], capsys), "unknown preset 'huge'; choose one of base"
    )


def test_info_with_a_negative_vocabulary(capsys):
    assert_refused(
        run(["info", "--vocab-size", "-5"], capsys), "--vocab-size must be a positive integer"
    )


def test_debug_shows_the_traceback_instead(tmp_path):
    """Without --debug: one line (tests/test_cli.py checks a real process); with it, the traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "aiayn.cli", "info", "--preset", "huge", "--debug"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.strip().splitlines()[-1] == (
        "aiayn.errors.ConfigError: unknown preset 'huge'; choose one of base, big, tiny"
    )


def test_resume_of_a_run_saved_before_a_model_field_existed(run_copy, capsys):
    """A run's config.yaml from an older aiayn lacks the fields added since: not a change."""
    record = yaml.safe_load((run_copy / "config.yaml").read_text(encoding="utf-8"))
    del record["model"]["output_bias"]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(record), encoding="utf-8")
    resume = ["train", run_copy.parent / "toy.yaml", "--run_dir", run_copy, "--resume", "--quiet"]
    assert run([*resume, "--train.max_steps", "3"], capsys)[0] == 0
