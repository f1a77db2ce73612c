"""Per-process scratch directories (``<name>.part<pid>``) and their cleanup.

A cache entry is written into ``<name>.part<pid>`` and renamed into place when
complete, so a reader never sees half an entry. A process killed with
``kill -9`` leaves its scratch directory behind; :func:`remove_stale_parts`
deletes those whose process is gone, and is called before each new write.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_PART = re.compile(r"^(?P<name>.+)\.part(?P<pid>\d+)$")


def scratch_dir(final: Path) -> Path:
    """Return this process's empty scratch directory for ``final``."""
    remove_stale_parts(final.parent)
    tmp = final.with_name(f"{final.name}.part{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_parts(parent: Path) -> list[Path]:
    """Delete the ``*.part<pid>`` entries of ``parent`` whose process is gone.

    Parameters
    ----------
    parent : Path
        Directory holding cache entries (need not exist).

    Returns
    -------
    list[Path]
        The entries removed.
    """
    if not parent.is_dir():
        return []
    gone = []
    for p in parent.iterdir():
        m = _PART.match(p.name)
        if m is None or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone
