"""aiayn.atomic: a file is replaced whole or not at all, and gets the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from aiayn import atomic
from aiayn.data.tokenizer import Tokenizer


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old\n", encoding="utf-8")
    for error in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)), atomic.replacing(path) as tmp:
            tmp.write_text("half of the ne", encoding="utf-8")
            raise error
        assert path.read_text(encoding="utf-8") == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    atomic.write_text(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_permissions_a_plain_open_leaves(tmp_path):
    # tempfile.mkstemp makes private files (0600); a run's tokenizer.json and a command's
    # --output written through one were unreadable by the rest of the user's group.
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "out.txt", "x\n")
        Tokenizer.train(["hello world"] * 10, vocab_size=50).save(tmp_path / "tokenizer.json")
    finally:
        os.umask(old)
    for name in ("out.txt", "tokenizer.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    # A file replaced keeps its own: a private one stays private.
    (tmp_path / "out.txt").chmod(0o600)
    atomic.write_text(tmp_path / "out.txt", "y\n")
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_read_only_file_is_replaced_and_stays_read_only(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    path.chmod(0o444)
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o444


def test_naming_file_names_the_file_of_an_error_that_names_none(tmp_path):
    # write(2) errors (a full disk) name no file; an error that names one keeps its own.
    with pytest.raises(OSError) as info, atomic.naming_file(tmp_path / "log"):
        raise OSError(28, "No space left on device")
    assert info.value.filename == str(tmp_path / "log")
    with pytest.raises(OSError) as info, atomic.naming_file(tmp_path / "log"):
        raise OSError(13, "Permission denied", str(tmp_path / "other"))
    assert info.value.filename == str(tmp_path / "other")


def test_is_temporary_knows_the_temporary_files_of_replacing_and_no_other(tmp_path):
    with atomic.replacing(tmp_path / "best.json") as tmp:
        assert atomic.is_temporary(tmp)
    for name in ("best.json", ".best.json", ".notes.tmp", ".best.json.tmp-15", "a.1-0a1b2c3d.tmp"):
        assert not atomic.is_temporary(tmp_path / name), name
