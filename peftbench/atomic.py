"""Writing a file so that a reader (or a process killed mid-write) never sees half of it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (``<name>.<pid>.tmp``) for writing; on success it is flushed to
    disk and renamed over ``path`` in one step, so ``path`` holds the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash never leaves a named, half-written file
    os.replace(tmp, path)
