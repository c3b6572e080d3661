"""The paper-to-code map stays true: every function and test it names exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_MAP = (ROOT / "docs" / "paper-map.md").read_text(encoding="utf-8")
RELIABILITY = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")


def defined_names(path: Path) -> set[str]:
    """Functions, classes, methods, constants, fields and attributes defined in a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    for node in ast.walk(tree):  # module constants and dataclass fields
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
            names |= {t.attr for t in targets if isinstance(t, ast.Attribute)}  # self.dropout = ...
    return names


def named_tests(doc: str, doc_name: str) -> list[tuple[str, str]]:
    """(test file, test function) for every `tests/x.py::name` and bare `::name` in a doc."""
    names = []
    for line in doc.splitlines():
        current = None  # a bare `::name` refers to the last test file named on the same line
        for match in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)", line):
            current = match.group(1) or current
            assert current, f"{doc_name}: name the test file before ::{match.group(2)}"
            names.append((current, match.group(2)))
    for file, name in names:
        assert name in defined_names(ROOT / file), (
            f"{doc_name} names {file}::{name}, which does not exist"
        )
    return names


def test_every_test_named_in_the_paper_map_exists():
    assert len(named_tests(PAPER_MAP, "docs/paper-map.md")) > 30


def test_every_test_named_in_the_reliability_table_exists():
    assert len(named_tests(RELIABILITY, "docs/reliability.md")) > 60


def test_every_code_symbol_named_in_the_paper_map_exists():
    """In "`model.py`: `Encoder`, `Transformer.decode(cache=...)`", Encoder and decode must exist."""
    checked = 0
    for file, symbols in re.findall(r"`(\w+(?:/\w+)*\.py)`: ((?:`[^`]+`(?:, )?)+)", PAPER_MAP):
        names = defined_names(ROOT / "src" / "aiayn" / file)
        for symbol in re.findall(r"`([A-Za-z_][\w.]*)", symbols):
            if symbol.startswith(("F.", "torch.", "nn.")):
                continue  # PyTorch's own
            *owner, name = symbol.split(".")
            if owner and owner[-1] in ("lut", "weight", "generator", "tgt_embed", "src_embed"):
                continue  # attributes, not definitions
            assert name in names, (
                f"docs/paper-map.md names {file}: {symbol}, which is not defined there"
            )
            checked += 1
    assert checked > 25
