"""Exceptions of the retrieval package.

Every error says what went wrong and how to fix it. All derive from `RetrievalError`, so a CLI can
catch one class and print the message without a stack trace.
"""

from __future__ import annotations

from rag.errors import RagError


class RetrievalError(RagError):
    """Base class of every retrieval error."""


class RetrievalInputError(RetrievalError, ValueError):
    """Bad arguments: wrong shape, dtype, NaN embeddings, n_docs out of range, unknown index kind."""


class IndexNotFoundError(RetrievalError, FileNotFoundError):
    """No saved index (no manifest) where one was expected."""


class IndexCorruptError(RetrievalError):
    """A saved index file is truncated, damaged or unreadable."""


class IndexMismatchError(RetrievalError):
    """A saved index was built with another encoder, dimension or corpus than the caller expects.

    ``differences`` maps each differing manifest field to ``(saved, expected)``.
    """

    def __init__(self, message: str, differences: dict[str, tuple] | None = None):
        super().__init__(message)
        self.differences = dict(differences or {})


class IndexStateError(RetrievalError, RuntimeError):
    """The index cannot do this in its current state (search before build, add beyond the L2-trick bound)."""


class IndexDeviceError(RetrievalError, RuntimeError):
    """A GPU index was asked for where faiss has no GPU support or the index kind has no GPU version."""
