"""Files that appear whole or not at all: write to a hidden temporary name beside the target, then
rename over it. A process killed mid-write leaves the previous file (or none), never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, fsync: bool = True) -> Iterator[IO]:
    """Open ``path`` for writing through a temporary file that replaces it on a clean exit.

    ``fsync`` flushes the data to disk before the rename, so the new file also survives a power cut
    (checkpoints, exported models); caches that can be rebuilt may skip it. On an error the temporary
    file is removed and the target is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files (mode 'w' or 'wb'), not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Build a folder in a sibling temporary one that replaces ``path`` on a clean exit: a killed run
    never leaves half an asset (a model without its report). Files get the usual 644/755 modes
    (``mkdtemp`` and safetensors make them owner-only)."""
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for item in (tmp, *tmp.rglob("*")):
            item.chmod(0o755 if item.is_dir() else 0o644)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
