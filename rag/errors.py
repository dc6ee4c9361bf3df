"""The package's one error root.

Every error this package raises on purpose derives from :class:`RagError`, so that a command catches one
class and prints its message as one line (``error: <problem>: <fix>``), and a Python caller can catch
everything the package signals with ``except rag.RagError``. The sub-packages keep their own bases
(:class:`rag.retrieval.errors.RetrievalError`, :class:`rag.data.errors.DataError`, ...) below this one;
each error also derives from the builtin it refines (``ValueError``, ``FileNotFoundError``, ...) so that
code written against the builtins keeps working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "RagError"]


class RagError(Exception):
    """Base class of every error the package raises on purpose; its message names the problem and the fix."""


class ConfigError(RagError, ValueError):
    """A configuration that cannot run: a required value unset, an option out of range, a bad path."""
