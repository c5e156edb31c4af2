"""Crash-safe output: write to a temporary file beside the target, fsync, then rename.

The temporary file is `.{name}.{pid}.partial` in the target's folder (same filesystem, so the rename
is atomic). A process killed with SIGKILL cannot remove its partial file; the next writer of the
same target removes partial files whose process is gone (`remove_stale_partials`), so a leftover
never fills the disk or confuses a re-run, and a partial of a conversion still running is left alone.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(target: Path) -> Path:
    """This process's temporary file for `target`."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove `.{target}.{pid}.partial` files left by processes that no longer run; returns them."""
    target = Path(target)
    prefix = f".{target.name}."
    removed = []
    for name in glob.glob(glob.escape(str(target.parent / prefix)) + "*" + PARTIAL_SUFFIX):
        p = Path(name)
        pid = p.name[len(prefix):-len(PARTIAL_SUFFIX)]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yields a temporary path in the target's folder; on success it replaces `target` atomically,
    on any failure (or Ctrl-C) it is removed and `target` is left as it was."""
    target = Path(target)
    remove_stale_partials(target)
    tmp = partial_path(target)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
