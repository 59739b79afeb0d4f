"""File modes of everything SmartClaw writes: files 0600, directories 0700, whatever the umask.

The data directories hold secrets and private data (the CA and broker keys, the credential store, the edge's
token key, every question and answer in ``edge.lmdb``, a day of answers in ``node.lmdb``), so nothing SmartClaw
creates is readable by other local users. Files are created with mode 0600 and directories with 0700 and then
``chmod``-ed to exactly that (a umask can only remove bits, never add them, but an odd umask such as 0277
would remove the owner's too). A data directory that is already more open (made by hand, restored from a
backup, created by an older SmartClaw) is tightened at start with a warning: :func:`secure_tree`.

On Windows (no POSIX modes) these functions create files and directories and change nothing else: protect the
data directories with NTFS permissions (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
POSIX = os.name == "posix"
_OPEN = 0o077  # group and other permission bits


def _chmod(path: str | os.PathLike[str], mode: int) -> None:
    if POSIX:
        os.chmod(path, mode)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (``Path.mkdir(parents=True)`` would create the
    parents with the umask's mode). An existing directory is left as it is (see :func:`secure_tree`)."""
    p = Path(path)
    missing: list[Path] = []
    q = p
    while not q.is_dir():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made by another process meanwhile
        _chmod(d, PRIVATE_DIR)
    return p


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename) with mode 0600, creating the directory (0700)
    if needed. An existing file is replaced, so it ends up 0600 whatever its mode was."""
    p = Path(path)
    private_dir(p.parent)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _chmod(tmp, PRIVATE_FILE)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def too_open(root: str | os.PathLike[str]) -> list[Path]:
    """``root`` and everything under it that group or others may access (symbolic links are not followed and
    not listed). Empty on Windows."""
    if not POSIX:
        return []
    out: list[Path] = []
    base = Path(os.path.realpath(root))  # a data_dir that is a symbolic link: its target
    try:
        if stat.S_IMODE(base.stat().st_mode) & _OPEN:
            out.append(base)
    except FileNotFoundError:
        return []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & _OPEN:
                out.append(p)
    return out


def secure_tree(root: str | os.PathLike[str], what: str = "data_dir") -> list[Path]:
    """Remove group/other permissions from ``root`` and everything under it, with one warning naming what was
    changed; returns the paths changed. Run at start on each data directory. A path that cannot be changed
    (owned by another user) is named in a warning and left alone."""
    changed: list[Path] = []
    failed: list[str] = []
    for p in too_open(root):
        try:
            os.chmod(p, stat.S_IMODE(p.lstat().st_mode) & ~_OPEN)
        except OSError as exc:
            failed.append(f"{p} ({exc.strerror})")
        else:
            changed.append(p)
    if changed:
        names = ", ".join(str(p) for p in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        log.warning("%s %s was readable by other users: removed group/other permissions from %d path(s): %s",
                    what, root, len(changed), names)
    if failed:
        log.warning("%s %s: cannot remove group/other permissions from %s", what, root, ", ".join(failed[:5]))
    return changed
