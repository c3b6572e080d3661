"""Shared test fixtures."""

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# The tests never reach a model hub: Hugging Face models in tests are built locally or come
# from an installed package. Offline mode makes a stray hub lookup fail at once, not time out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test's tiny models on one CPU thread, then restore the setting.

    Matrices of 32 x 64 gain nothing from intra-op threads, and on a busy 2-core machine the
    threads' spin-waiting made tiny-model training ~100x slower (50 s instead of 0.5 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- a toy translation run

TOY_WORDS = "ein zwei drei vier fünf sechs sieben acht neun zehn hund katze mann frau kind ball"


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Word reversal ("ein hund" -> "hund ein"): 300 training and 20 validation pairs.

    Generated from a fixed seed, so tests need no downloaded data and always see the same files.
    """
    folder = tmp_path_factory.mktemp("toy_corpus")
    rng = random.Random(0)
    words = TOY_WORDS.split()
    paths = {}
    for split, n in (("train", 300), ("valid", 20)):
        sentences = [[rng.choice(words) for _ in range(rng.randint(2, 8))] for _ in range(n)]
        sides = {
            "src": [" ".join(s) for s in sentences],
            "tgt": [" ".join(reversed(s)) for s in sentences],
        }
        for side, lines in sides.items():
            path = folder / f"{split}.{side}"
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            paths[f"{split}_{side}"] = path
    return paths


@pytest.fixture(scope="session")
def toy_config(toy_corpus: dict[str, Path]) -> Callable[..., Path]:
    """A function that writes the YAML of a tiny translation run on `toy_corpus`.

    ``toy_config(path, run_dir, train={"max_steps": 2})`` writes ``path`` and returns it; each
    keyword updates that section. The run: a 1+1-layer model, 8 steps, a checkpoint every 2,
    validation every 4, all in a few seconds. Dropout is on, so a resumed run matches an
    uninterrupted one only if the random number generators are restored too.
    """

    def write(path: Path, run_dir: Path, **sections: dict[str, Any]) -> Path:
        values: dict[str, Any] = {
            "task": "translation",
            "run_dir": str(run_dir),
            "model": {"d_model": 32, "d_ff": 64, "n_heads": 2, "n_encoder_layers": 1,
                      "n_decoder_layers": 1, "dropout": 0.1, "max_len": 64},
            "data": {"format": "text", **{k: str(p) for k, p in toy_corpus.items()},
                     "vocab_size": 100, "min_frequency": 1},
            "train": {"max_steps": 8, "max_tokens": 256, "warmup_steps": 4, "eval_every": 4,
                      "save_every": 2, "log_every": 1, "device": "cpu", "seed": 1},
            "decode": {"beam_size": 1},
        }  # fmt: skip
        for name, changes in sections.items():
            values[name].update(changes)
        path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        return path

    return write
