"""Tests of the embedded demo (aiayn.tasks.demo): it runs end to end and reports consistently."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aiayn.errors import ConfigError
from aiayn.tasks import numbers
from aiayn.tasks.demo import DemoConfig, DemoResult, Translation, format_result, run_demo
from aiayn.train import Trainer, TrainingStopped

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A few steps of a very small model: checks the plumbing, not the learning (seconds on a CPU).
TINY = DemoConfig(
    n_train=300,
    n_valid=20,
    n_test=40,
    d_model=32,
    n_heads=2,
    d_ff=64,
    n_layers=1,
    max_steps=6,
    max_tokens=256,
    warmup_steps=2,
    eval_every=3,
    n_examples=4,
    heatmap_number=57_861,
)


def test_run_demo_tiny_end_to_end(tmp_path: Path) -> None:
    result = run_demo(tmp_path, TINY, progress=False)

    for path in (result.heatmap_path, result.curves_path):
        assert path.parent == tmp_path
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    log = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert any("loss" in record for record in log)
    assert any("exact_match" in record for record in log)  # the validation callback ran

    assert result.n_test == TINY.n_test
    assert result.steps == TINY.max_steps
    assert result.tested_step in (3, 6)  # a validated step: eval_every=3
    assert 0 <= result.n_correct <= result.n_test
    assert 0.0 <= result.exact_match <= 100.0
    assert result.exact_match == pytest.approx(100.0 * result.n_correct / result.n_test)
    assert 0.0 < result.train_seconds <= result.total_seconds
    assert result.n_parameters > 0
    assert "57,861" in result.heatmap_title and "layer" in result.heatmap_title

    assert len(result.examples) == TINY.n_examples
    assert len({t.number for t in result.examples}) == TINY.n_examples
    for t in result.examples + result.mistakes:
        assert t.english == numbers.english_text(t.number)
        assert t.reference == numbers.german_text(t.number)
        assert isinstance(t.predicted, str)
        assert t.correct == (t.predicted == t.reference)
    assert all(not t.correct for t in result.mistakes)

    report = format_result(result)
    assert f"{result.examples[0].english} -> " in report
    assert str(result.heatmap_path) in report and str(result.curves_path) in report


def test_run_demo_replaces_previous_run_log(tmp_path: Path) -> None:
    small = TINY.replace(max_steps=2, eval_every=0, n_test=5, n_examples=1)
    run_demo(tmp_path, small, progress=False)
    run_demo(tmp_path, small, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in log if "loss" in record]
    assert steps == sorted(steps), "the second run appended to the first run's log"


def test_a_stopped_demo_says_to_run_it_again(tmp_path: Path, monkeypatch) -> None:
    """The demo has no --resume: a signal's message says what to do instead."""
    train_step = Trainer.train_step

    def step_then_signal(self):
        result = train_step(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGTERM)  # as `kill` would, mid-run
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingStopped) as stopped:
        run_demo(tmp_path, TINY, progress=False)
    message = str(stopped.value)
    assert f"stopped by signal {int(signal.SIGTERM)} at step 2" in message
    assert "run `aiayn demo` again" in message and "--resume" not in message


def test_format_result_marks_right_and_wrong() -> None:
    right = Translation(
        342, "three hundred forty-two", "dreihundertzweiundvierzig", "dreihundertzweiundvierzig"
    )
    wrong = Translation(16, "sixteen", "sechszehn", "sechzehn")
    result = DemoResult(
        exact_match=50.0,
        n_test=2,
        n_correct=1,
        train_seconds=1.0,
        total_seconds=2.0,
        steps=10,
        tested_step=8,
        n_parameters=1000,
        heatmap_path=Path("out/attention.png"),
        curves_path=Path("out/training_curves.png"),
        heatmap_title="t",
        examples=[right, wrong],
        mistakes=[wrong],
    )
    report = format_result(result)
    assert "three hundred forty-two -> dreihundertzweiundvierzig ✓" in report
    assert "sixteen -> sechszehn ✗" in report
    assert "sixteen -> sechszehn ✗ (correct: sechzehn)" in report
    assert "50.00%" in report


@pytest.mark.parametrize(
    "change", [{"n_test": 0}, {"max_steps": 0}, {"heatmap_number": 1_000_000}, {"d_model": 30}]
)
def test_demo_config_rejects_bad_values(change: dict) -> None:
    with pytest.raises(ConfigError):
        DemoConfig(**change)


@pytest.mark.slow
def test_default_demo_learns_the_task(tmp_path: Path) -> None:
    result = run_demo(tmp_path, progress=False)
    assert result.n_test == DemoConfig().n_test
    assert result.exact_match >= 95.0, format_result(result)


def test_aiayn_translate_loads_the_demos_checkpoint(tmp_path: Path, capsys) -> None:
    """`aiayn translate --checkpoint <demo>/run` (a user's natural next step after `make
    demo`) translates as the demo does: the same weights, tokens and greedy search give the
    demo's own translations, German written as one word; English typed with capitals and
    hyphens reads as the demo's tokens. `aiayn classify` names what the checkpoint holds, in
    one line; so does a command given the run of a demo from before its checkpoints named
    their task."""
    from aiayn.cli import main
    from aiayn.tasks.demo import translate_numbers
    from aiayn.tasks.translation import Translator, task_model

    run_demo(tmp_path, TINY.replace(max_steps=4, eval_every=2, n_test=5, n_examples=1),
             progress=False)  # fmt: skip
    run = tmp_path / "run"
    values = [0, 7, 21, 342, 17_017, 999_999]
    text = tmp_path / "numbers.txt"
    english = [numbers.english_text(n) for n in values]
    text.write_text("\n".join(e.capitalize() for e in english) + "\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(run), "--input", str(text)]) == 0
    got = capsys.readouterr().out.splitlines()
    translator = Translator.from_checkpoint(run)
    vocab = [translator.tokenizer.id_to_token(i) for i in range(translator.tokenizer.vocab_size)]
    assert [translator.tokenizer.encode(e.upper()) for e in english] == [
        [vocab.index(w) for w in numbers.english_words(n)] for n in values
    ]
    expected = ["".join(words) for words in translate_numbers(translator.model, values, vocab)]
    assert got == expected and any(got), (got, expected)

    # The README's line, as a user runs it after `make demo` (runs/demo is the default --out).
    sys.path.insert(0, str(Path(__file__).parent))
    from test_readme import demo_lines

    (line,) = [line for line in demo_lines() if "runs/demo/run" in line]
    bin_dir = Path(sys.executable).parent
    (tmp_path / "user" / "runs").mkdir(parents=True)
    (tmp_path / "user" / "runs" / "demo").symlink_to(tmp_path)
    proc = subprocess.run(
        ["bash", "-c", line.replace("aiayn ", f"{bin_dir / 'aiayn'} ", 1)],
        cwd=tmp_path / "user",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (number,) = re.findall(r'echo "([a-z -]+)"', line)
    value = 600_012
    assert numbers.english_text(value) == number, "the README translates another number"
    expected = translate_numbers(translator.model, [value], vocab)
    assert proc.stdout == "".join(expected[0]) + "\n"

    assert main(["classify", "--checkpoint", str(run)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'translation' model" in err and "not a classifier" in err
    older = task_model({"demo": {}, "model": {}})
    assert "older `aiayn demo`" in older and "run `aiayn demo` again" in older
