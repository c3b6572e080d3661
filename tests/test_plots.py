"""Tests of aiayn.plots: PNG files are written and valid, and bad input is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from aiayn.errors import DataError
from aiayn.plots import attention_heatmap, training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    height, width, _ = image.shape
    assert height > 100 and width > 100


def test_attention_heatmap_writes_png(tmp_path: Path) -> None:
    source = ["▁Das", "▁ist", "▁ein", "▁Test", "."]
    target = ["▁This", "▁is", "▁a", "▁test", ".", "</s>"]
    weights = torch.softmax(torch.randn(len(target), len(source)), dim=-1)
    out = attention_heatmap(weights, source, target, tmp_path / "a" / "b" / "attn.png", title="L1")
    assert out == tmp_path / "a" / "b" / "attn.png"
    assert_valid_png(out)


def test_attention_heatmap_many_tokens_numpy(tmp_path: Path) -> None:
    source = [f"s{i}" for i in range(40)]
    target = [f"t{i}" for i in range(35)]
    out = attention_heatmap(np.random.rand(35, 40), source, target, str(tmp_path / "big.png"))
    assert_valid_png(out)


def test_attention_heatmap_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        attention_heatmap(np.zeros((3, 4)), ["a", "b", "c"], ["w", "x", "y", "z"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_training_curves_all_panels(tmp_path: Path) -> None:
    lines = [
        json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-4 * min(s, 10) / 10}) for s in range(1, 31)
    ]
    lines += [
        json.dumps({"step": s, "val_loss": 4.0 / s, "bleu": s, "rouge1": 2 * s, "exact_match": s})
        for s in (10, 20, 30)
    ]
    log = write_log(tmp_path / "metrics.jsonl", lines)
    assert_valid_png(training_curves(log, tmp_path / "plots" / "curves.png", title="run"))


def test_training_curves_loss_only(tmp_path: Path) -> None:
    log = write_log(tmp_path / "m.jsonl", [json.dumps({"step": s, "loss": 1 / s}) for s in (1, 2)])
    assert_valid_png(training_curves(log, tmp_path / "c.png"))


def test_training_curves_skips_corrupted_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [json.dumps({"step": 1, "loss": 3.0}), '{"step": 2, "lo', json.dumps({"step": 3})]
    lines.append(json.dumps({"step": 4, "loss": 2.0, "val_accuracy": 50.0}))
    log = write_log(tmp_path / "m.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="aiayn.plots"):
        out = training_curves(log, tmp_path / "c.png")
    assert_valid_png(out)
    assert any("m.jsonl:2" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("content", [None, "", "\n\n", "not json\n"], ids=str)
def test_training_curves_missing_or_empty_log(tmp_path: Path, content: str | None) -> None:
    log = tmp_path / "metrics.jsonl"
    if content is not None:
        log.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="metrics log"):
        training_curves(log, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_training_curves_nothing_to_plot(tmp_path: Path) -> None:
    log = write_log(tmp_path / "m.jsonl", [json.dumps({"step": 1, "epoch": "one"})])
    with pytest.raises(DataError, match="nothing|no loss"):
        training_curves(log, tmp_path / "c.png")
