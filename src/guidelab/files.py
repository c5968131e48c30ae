"""Writing files so that a crash never leaves half of one, and naming what was written or read by a digest.

One helper each, used by every module that writes or keys a file: `atomic_write` (checkpoints, sampling shards and
their job record, samples.npz, metrics.json, the cache entries), `key_digest` (a dict of settings as a short stable
name: cache entries, a sampling job's record) and `file_digest` / `file_stamp` (a file's content or its size and
modification time: what a cached or resumed result was computed from).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a new temporary file in path's directory (a unique mkstemp name, so concurrent writers never
    share one), flush and fsync it, then rename it over `path`: a reader sees the old file or the whole new one, and a
    crash leaves any previous file intact (the temporary file is removed on failure). The directory is fsynced after
    the rename where the filesystem allows, so that the new name survives a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # some filesystems cannot open or fsync a directory: the rename stands
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch(obj, path: str | os.PathLike) -> Path:
    """`atomic_write` of torch.save(obj) (checkpoints, cache entries)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_npz(path: str | os.PathLike, **arrays) -> Path:
    """`atomic_write` of numpy.savez(**arrays) (samples.npz, the sampling shards)."""
    import numpy as np

    return atomic_write(path, lambda f: np.savez(f, **arrays))


def key_digest(key: dict, length: int | None = None) -> str:
    """The SHA-256 of a dict of settings in canonical JSON (sorted keys; values JSON cannot hold as their str), in hex,
    cut to `length` characters where given: equal settings give equal digests in any process and order."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return digest if length is None else digest[:length]


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, in hex (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | os.PathLike) -> dict:
    """What names one version of a file without reading it: its resolved path, size and modification time (ns). A
    replaced or rewritten file (a new checkpoint at the same path, a copied-over model directory) gets a new stamp."""
    path = Path(path).resolve()
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tree_stamp(root: str | os.PathLike, names: list[str] | None = None) -> list[dict]:
    """`file_stamp` of every file under a directory (sorted by path; hidden files and folders left out), or of the
    listed relative `names` only: what a model directory's readers read."""
    root = Path(root)
    if names is not None:
        return [file_stamp(root / n) for n in sorted(names) if (root / n).is_file()]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))
    return [file_stamp(p) for p in files]
