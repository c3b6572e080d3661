"""The README's promises, replayed: its two commands, its Python example, its tour of the CLI."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"


def indented_commands() -> list[str]:
    """The README's command lines: indented blocks of shell (not the Python example)."""
    return [
        m.group(1).strip()
        for m in re.finditer(r"^    (\S.*)$", README, flags=re.M)
        if "/" not in m.group(1)[:1]
    ]


def test_the_two_commands_and_ci_agree():
    commands = indented_commands()
    assert commands[:2] == ["make demo", "make test"], "the README's first two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run must run the README's test command"
    dry = subprocess.run(
        ["make", "-n", "test", "demo"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "ruff check src tests bench" in dry and "pytest" in dry and "aiayn demo" in dry
    assert (
        "torch==2.13.0" in (ROOT / "Makefile").read_text()
    )  # pinned: an unpinned torch pulls CUDA


def test_the_python_example_runs():
    block = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert tuple(namespace["logits"].shape) == (2, 7, 37000)
    assert tuple(namespace["step"].shape) == (2, 1, 37000)


def aiayn_lines() -> list[str]:
    return [
        c.split("#")[0].strip()
        for c in indented_commands()
        if "aiayn " in c and not c.startswith("make")
    ]


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs ../shared/data/multi30k")
def test_the_tour_commands_run(tmp_path):
    """Each `aiayn ...` line of the tour, in order, on a tiny Multi30k run (overrides keep it fast)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(MULTI30K / "test_2016_flickr.de.gz", tmp_path)
    shutil.copy(MULTI30K / "test_2016_flickr.en.gz", tmp_path)
    tiny = ("--model.d_model 32 --model.d_ff 64 --model.n_heads 2 --model.n_encoder_layers 1 "
            "--model.n_decoder_layers 1 --data.vocab_size 300 --data.max_train_examples 300 "
            "--data.max_valid_examples 20 --train.max_steps 6 --train.save_every 1 --train.eval_every 3 "
            "--train.max_tokens 512 --quiet")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    ran = []
    for line in aiayn_lines():
        if line.startswith("aiayn demo"):
            continue  # the demo has its own tests (tests/test_demo.py)
        line = line.replace("path/to/multi30k", str(MULTI30K))
        if " train " in f" {line} ":
            line += " " + tiny
        if "evaluate" in line:
            line += " --beam-size 1 --quiet"
        cmd = line.replace("aiayn ", f"{bin_dir / 'aiayn'} ", 1)
        proc = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
        ran.append(line.split("aiayn ", 1)[1].split()[0])
    assert ran == ["info", "info", "train", "translate", "evaluate", "average"]


# --------------------------------------------------------------------------- the two commands, for real

replaying = pytest.mark.skipif(
    os.environ.get("AIAYN_README_REPLAY") == "1", reason="inside a replay already"
)


def fresh_clone(tmp_path: Path) -> Path:
    """A clone of the committed tree, as a new user gets it (uncommitted changes are not in it)."""
    clone = tmp_path / "aiayn"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    if (ROOT.parent / "shared").is_dir():  # the shared data sits beside the checkout, as in CI
        (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    return clone


@pytest.mark.slow
@replaying
def test_make_demo_on_a_fresh_clone(tmp_path):
    """The README's first command: sets up .venv, trains the demo, prints its translations."""
    clone = fresh_clone(tmp_path)
    env = {**os.environ, "AIAYN_README_REPLAY": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact match" in proc.stdout
    assert (clone / "runs" / "demo" / "attention.png").is_file()


@pytest.mark.slow
@replaying
def test_make_test_on_a_fresh_clone(tmp_path):
    """The README's second command: sets up .venv with the test extras, lints, passes the tests."""
    clone = fresh_clone(tmp_path)
    env = {**os.environ, "AIAYN_README_REPLAY": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["make", "test"], cwd=clone, env=env, capture_output=True, text=True, timeout=3600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
