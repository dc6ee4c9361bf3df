"""Atomic file writes: a crash or an interrupt never leaves a half-written file that looks whole.

The content goes to a temporary file in the same folder (so the rename cannot cross file systems), is
flushed to disk, and then replaces the target in one ``os.replace``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_sibling(path: str | os.PathLike) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place (same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, the file written there
    (by any writer: ``np.save``, ``faiss.write_index``, ``torch.save`` ...) replaces ``path`` in one
    ``os.replace``. On an error the temporary file is removed and ``path`` is left as it was.

        with atomic_path(out / "embeddings.npy") as tmp:
            np.save(tmp, array)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents created); returns the path."""
    with atomic_path(path, fsync=False) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps_kwargs) -> Path:
    """Write ``data`` as JSON (indent 1, sorted keys unless overridden) to ``path`` atomically."""
    dumps_kwargs = {"indent": 1, "sort_keys": True, **dumps_kwargs}
    return write_text_atomic(path, json.dumps(data, **dumps_kwargs))


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in blocks (files of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def replace_atomic(tmp: str | os.PathLike, path: str | os.PathLike, *, fsync: bool = True) -> Path:
    """Flush the finished file ``tmp`` (named by :func:`temporary_sibling`) to disk and rename it onto ``path``
    in one ``os.replace``: for writers that fill a file over several calls (a memmap written batch by batch,
    an Arrow stream), which cannot run inside one :func:`atomic_path` block."""
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block ends without an error, it becomes
    ``path``. A folder already at ``path`` is moved aside first and removed after the new one is renamed in,
    so a crash leaves the old folder or the new one (or the old one under its temporary name beside it),
    never a half-written folder under ``path``. On an error the temporary folder is removed.

        with atomic_dir(out / "generator") as tmp:
            model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    old = tmp.with_name(f".{path.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had this pid
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
