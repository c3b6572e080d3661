"""Writing files so that a crash leaves the old file or the new one, never half of one.

Every file aiayn writes for the user to keep (a run's ``config.yaml``, its training log when a
resume trims it, ``test_scores.json``, a tokenizer, a download, a command's ``--output``) is
written through `replacing`: the data goes to a hidden temporary sibling, is flushed to disk,
and is renamed over the target (a rename within one folder is atomic on POSIX). Checkpoints
are folders and have their own, larger, version of the same idea (`aiayn.checkpoint`).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "is_temporary", "naming_file", "replacing", "write_text"]

# The name of `replacing`'s temporary file: ".<name>.<pid>-<8 hex digits>.tmp".
_TEMPORARY_NAME = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp")


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends without error, it becomes ``path``.

    The temporary file is a hidden sibling of ``path`` (so the final rename stays within one
    filesystem), with the permissions of the file it replaces (a new file: 0666 less the
    umask). On success it is fsynced and renamed over ``path``; on any error, including
    KeyboardInterrupt, it is removed and ``path`` is left as it was. The parent folder must
    exist.

    Raises:
        OSError: the temporary file cannot be created, written or renamed.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    # Not tempfile.mkstemp: its files are private (0600). The file keeps the permissions a
    # plain open() would leave: an existing file's own, a new one 0666 less the umask.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        try:  # after writing: a read-only original would make the copy unwritable
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        except FileNotFoundError:
            pass
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named as `replacing`'s temporary files are.

    Only a kill (between creating the file and renaming it) leaves one behind once its
    process has ended: what cleans up after killed runs (`aiayn.checkpoint.remove_leftovers`)
    finds them by this name.
    """
    return _TEMPORARY_NAME.fullmatch(Path(path).name) is not None


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def naming_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """Attach ``path`` to an OSError raised in the block that lacks a file name.

    write(2) errors (a full disk) name no file, and a message without one does not say which
    write failed.
    """
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; renames there are as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems do not support fsync on folders; that is not a failed write.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)
