"""Figures: attention heatmaps and training curves, written as PNG files.

Matplotlib is switched to the non-interactive ``Agg`` backend before pyplot is imported, so
plotting works on servers and in CI with no display. Every function builds its own figure and
closes it, so nothing leaks between calls.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # must precede the pyplot import: no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aiayn import atomic  # noqa: E402
from aiayn.errors import DataError  # noqa: E402

__all__ = ["attention_heatmap", "training_curves"]

logger = logging.getLogger(__name__)

_DPI = 150
# Validation metrics drawn in the third panel, in this order; any other numeric key whose
# name starts with "rouge" or "val_" (except val_loss, which shares the loss panel) joins them.
_METRIC_KEYS = ("bleu", "chrf", "exact_match", "accuracy", "val_accuracy", "macro_f1")


def _to_numpy(weights: Any) -> np.ndarray:
    """Return ``weights`` (a tensor, array or nested list) as a float numpy array."""
    if hasattr(weights, "detach"):  # a torch tensor, possibly on a GPU or requiring grad
        weights = weights.detach().float().cpu().numpy()
    return np.asarray(weights, dtype=float)


def attention_heatmap(
    weights: Any,
    source_tokens: list[str],
    target_tokens: list[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Draw one attention matrix as a heatmap with token labels and save it as PNG.

    Args:
        weights: A ``(T, S)`` array or tensor: row ``t`` is how target token ``t`` attends over
            the source tokens.
        source_tokens: The ``S`` source tokens, labelled along the x axis.
        target_tokens: The ``T`` target tokens, labelled along the y axis.
        path: Where to write the PNG; missing parent directories are created.
        title: An optional figure title.

    Returns:
        ``path`` as a `Path`.

    Raises:
        ValueError: if ``weights`` is not of shape ``(len(target_tokens), len(source_tokens))``.
    """
    matrix = _to_numpy(weights)
    expected = (len(target_tokens), len(source_tokens))
    if matrix.shape != expected:
        raise ValueError(
            f"attention weights have shape {matrix.shape} but the tokens give {expected} "
            "(len(target_tokens), len(source_tokens)); pass one row per target token"
        )
    rows, cols = expected
    # Grow the figure with the token count so that labels stay legible from 5 to ~40 tokens.
    width = min(max(4.0, 0.3 * cols + 2.5), 16.0)
    height = min(max(3.5, 0.3 * rows + 2.0), 16.0)
    fontsize = 9 if max(rows, cols) <= 25 else 7

    fig, ax = plt.subplots(figsize=(width, height))
    try:
        image = ax.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(cols), labels=source_tokens, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(rows), labels=target_tokens, fontsize=fontsize)
        ax.set_xlabel("source")
        ax.set_ylabel("target")
        if title:
            ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _read_log(log_path: Path) -> list[dict[str, Any]]:
    """Read a JSONL metrics log, skipping (with a warning) lines that are not JSON objects."""
    if not log_path.is_file():
        raise DataError(
            f"metrics log {log_path} does not exist; pass the train.jsonl a training run wrote"
        )
    records = []
    with log_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a truncated last line; the rest is still good.
                logger.warning("%s:%d: skipping a line that is not JSON", log_path, lineno)
                continue
            if not isinstance(record, dict) or not _is_number(record.get("step")):
                logger.warning("%s:%d: skipping a line with no numeric 'step'", log_path, lineno)
                continue
            records.append(record)
    if not records:
        raise DataError(
            f"metrics log {log_path} has no records with a 'step'; "
            "let training log at least one step before plotting"
        )
    return records


def _is_number(value: Any) -> bool:
    """True for finite ints and floats (bools, NaN and inf are not plotted)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The (steps, values) of the records that have a numeric ``key``."""
    points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _metric_keys(records: list[dict[str, Any]]) -> list[str]:
    """The validation metrics present in the log: known ones first, then rouge*/val_* keys."""
    present = {k for r in records for k, v in r.items() if _is_number(v)}
    extra = sorted(
        k
        for k in present
        if (k.startswith("rouge") or k.startswith("val_")) and k not in ("val_loss", *_METRIC_KEYS)
    )
    return [k for k in _METRIC_KEYS if k in present] + extra


# The training loss includes label smoothing (§5.4), the validation loss does not: say so,
# or the gap between them reads as overfitting.
_LABELS = {"loss": "train loss (label-smoothed)", "val_loss": "validation loss (cross-entropy)"}


def training_curves(log_path: str | Path, path: str | Path, *, title: str | None = None) -> Path:
    """Plot a training run's JSONL metrics log as up to three panels and save it as PNG.

    Each line of the log is a JSON object with a ``"step"`` and any numeric metrics. Panels,
    each drawn only if it has data:

    1. ``loss`` (training) and ``val_loss`` against step;
    2. ``lr`` against step;
    3. validation metrics against step: ``bleu``, ``chrf``, ``exact_match``, ``accuracy``,
       ``val_accuracy``, ``macro_f1``, and any ``rouge*`` or other ``val_*`` key.

    Lines that are not JSON objects with a numeric ``step`` are skipped with a logged warning.

    Args:
        log_path: The JSONL metrics log.
        path: Where to write the PNG; missing parent directories are created.
        title: An optional figure title.

    Returns:
        ``path`` as a `Path`.

    Raises:
        DataError: if the log is missing, has no usable record, or has nothing to plot.
    """
    log_path = Path(log_path)
    records = _read_log(log_path)

    panels: list[tuple[str, list[str]]] = []
    loss_keys = [k for k in ("loss", "val_loss") if _series(records, k)[0]]
    if loss_keys:
        panels.append(("loss", loss_keys))
    if _series(records, "lr")[0]:
        panels.append(("learning rate", ["lr"]))
    metric_keys = _metric_keys(records)
    if metric_keys:
        panels.append(("validation metrics", metric_keys))
    if not panels:
        raise DataError(
            f"metrics log {log_path} has no loss, lr or validation metric to plot; "
            "check that it is a training metrics log"
        )

    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2.8 * len(panels) + 0.6), sharex=True, squeeze=False
    )
    try:
        for ax, (ylabel, keys) in zip(axes[:, 0], panels, strict=True):
            for key in keys:
                steps, values = _series(records, key)
                # Validation points are sparse, so mark them; dense training curves stay lines.
                marker = "o" if len(steps) <= 50 else None
                label = _LABELS.get(key, key)
                ax.plot(steps, values, label=label, marker=marker, markersize=3)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if ylabel == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            else:
                ax.legend(fontsize=8)
        axes[-1, 0].set_xlabel("step")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path``, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:  # a kill while saving leaves the last plot whole
        fig.savefig(tmp, dpi=_DPI, format="png")
    return path
