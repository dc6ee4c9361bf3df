"""Errors raised on bad data: each names the file, the line and the fix, so that users never read a deep
stack trace to learn that row 12,345 of their corpus has two tabs too few."""

from __future__ import annotations

import os

from rag.errors import RagError


class DataError(RagError):
    """Base class of every data-layer error (catch this to catch them all)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist."""

    def __init__(self, path: str | os.PathLike, what: str = "data file", hint: str = ""):
        self.path = str(path)
        message = f"{what} not found: {self.path}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __str__(self) -> str:  # FileNotFoundError would print "[Errno None]" otherwise
        return self.args[0]


class DataFormatError(DataError, ValueError):
    """A file whose content is not what its format promises.

    ``path`` and ``line`` (1-based physical line, or the record number for JSON lists) say where.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str, hint: str = ""):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        message = f"{where}: {reason}"
        if hint:
            message += f". {hint}"
        super().__init__(message)


class DuplicatePassageIdError(DataFormatError):
    """Two passages of one corpus with the same id (ids index the corpus, so they must be unique)."""


class ChecksumError(DataFormatError):
    """A shipped data file whose SHA-256 differs from the recorded one (corrupt, truncated or edited)."""


class HubUnavailableError(DataError, ConnectionError):
    """The dataset hub cannot be reached (offline mode, no network): load a local file instead."""


class SkippedRowsWarning(UserWarning):
    """Malformed rows were skipped (``strict=False``): the message gives their count and the first one."""
