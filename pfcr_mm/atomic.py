"""Files written whole or not at all: :func:`atomic_path`.

A file is written under a temporary name in its own folder and renamed over the final name
once complete (``os.replace``, atomic on POSIX and Windows within one file system): a reader,
or a run killed mid-write, never sees or leaves a half-written file, and an earlier file of the
same name stays intact until the new one is complete. Pure Python, below every layer: the
quantizers, the reconstruction logs and the MMEngine side all write through it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# below this many free bytes a failed write is taken for a full disk: torch.save reports one as
# a RuntimeError ("unexpected pos") without an errno
FULL_BELOW = 1 << 20


class DiskFullError(OSError):
    """A file could not be written for lack of space; the message names the path, the space
    left and the bytes the file had reached."""


# the temporary name of atomic_path: .<stem>.<pid>.tmp<suffix>
TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp(\.[^.]*)?$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left below ``folder`` in processes that
    are gone (killed while writing: their ``finally`` never ran); returns them."""
    removed = []
    for path in Path(folder).rglob(".*.tmp*"):
        match = TEMPORARY.match(path.name)
        if match and path.is_file() and not _alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix, so writers that read the format off it
    work) to write to; renamed to ``path`` when the block ends, removed if it raises.

    ::

        with atomic_path(out / "results.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    # the process id keeps processes that write the same file from sharing a temporary one
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # measured before the partial file is removed (the finally): freeing it would make
        # the device look less full than it was when the write failed
        written = tmp.stat().st_size if tmp.exists() else 0
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < FULL_BELOW):
            full = DiskFullError(
                f"no space left to write {path}: {free} bytes free on its device, the file had "
                f"reached {written} bytes; free space there or write elsewhere (--work-dir)"
            )
            full.errno = errno.ENOSPC
            raise full from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
