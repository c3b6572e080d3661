"""Tests of the embedded demo (aiayn.tasks.demo): it runs end to end and reports consistently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiayn.errors import ConfigError
from aiayn.tasks import numbers
from aiayn.tasks.demo import DemoConfig, DemoResult, Translation, format_result, run_demo

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


def test_the_demos_checkpoint_is_named_when_a_command_cannot_load_it(
    tmp_path: Path, capsys
) -> None:
    """`aiayn translate` or `classify` on the demo's run (a user's natural next step after
    `make demo`) says what the checkpoint is, in one line, instead of "a None model"."""
    from aiayn.cli import main

    run_demo(tmp_path, TINY.replace(max_steps=2, eval_every=0, n_test=5, n_examples=1),
             progress=False)  # fmt: skip
    for command, expected in (
        ("translate", "not a translation model"),
        ("classify", "not a classifier"),
    ):
        assert main([command, "--checkpoint", str(tmp_path / "run")]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "the model of `aiayn demo`" in err and expected in err and "None" not in err
