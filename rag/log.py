"""The package's logging setup for the commands: one stderr handler on the ``rag`` logger, rank zero only.

Library modules log with ``log = logging.getLogger(__name__)`` and never configure logging, so a Python user
who configures nothing sees the package's warnings (Python's last-resort handler prints them to stderr) and
none of its progress lines. Each ``rag-*`` command calls :func:`configure_logging` once at start; a script, a
notebook or a test run may call it too, or set ``RAG_LOG_LEVEL`` (``debug``, ``info``, ``warning``,
``error``) before ``rag`` is imported (:func:`configure_from_env`).

A line names where it comes from as the package printed it before it logged: ``[rag.arrow] converting ...``
from the library module ``rag.data.arrow`` (the package and the module's own name), ``[rag-train] ...`` from
the command module ``rag.cli.train`` (the command's name); warnings and errors also say so
(``[rag.aggregate] warning: ...``). Under DDP only rank zero logs (``RAG_LOG_ALL_RANKS=1`` lets every rank
log), so that N processes do not print every line N times.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping

from rag.errors import ConfigError

__all__ = [
    "LEVELS",
    "RankZeroFilter",
    "StderrHandler",
    "configure_from_env",
    "configure_logging",
    "parse_level",
    "process_rank",
    "short_name",
]

#: the names and the numbers (``-1`` .. ``2``) a verbosity may be given as
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
VERBOSITIES = {-1: logging.DEBUG, 0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR}
#: the environment variables a launcher sets to a process's rank, in the order Lightning reads them
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
LEVEL_VARIABLE = "RAG_LOG_LEVEL"
ALL_RANKS_VARIABLE = "RAG_LOG_ALL_RANKS"


def parse_level(verbosity: int | str) -> int:
    """The logging level of a verbosity: ``"debug"``/``"info"``/``"warning"``/``"error"`` or ``-1``..``2``."""
    if isinstance(verbosity, str):
        name = verbosity.strip().lower()
        if name in LEVELS:
            return LEVELS[name]
        try:
            verbosity = int(name)
        except ValueError:
            verbosity = None  # type: ignore[assignment]
    if isinstance(verbosity, int) and not isinstance(verbosity, bool) and verbosity in VERBOSITIES:
        return VERBOSITIES[verbosity]
    raise ConfigError(
        f"unknown log verbosity {verbosity!r}: use one of {', '.join(LEVELS)} or {min(VERBOSITIES)}..{max(VERBOSITIES)}"
    )


def short_name(name: str) -> str:
    """``rag.data.arrow`` -> ``rag.arrow``, ``rag.cli.eval_retrieval`` -> ``rag-eval-retrieval``; others as given."""
    parts = name.split(".")
    if parts[0] != "rag" or len(parts) == 1:
        return name
    if parts[1] == "cli" and len(parts) > 2:
        return "rag-" + parts[-1].replace("_", "-")
    return "rag." + parts[-1]


def process_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank: from the launcher's environment (torchrun, SLURM, ...) or, once Lightning has set
    it (it does when a strategy starts, after the process has), from ``rank_zero_only.rank``; 0 otherwise."""
    environ = os.environ if environ is None else environ
    for variable in RANK_VARIABLES:
        value = environ.get(variable)
        if value not in (None, ""):
            try:
                rank = int(value)
            except ValueError:
                continue
            if rank:
                return rank
            break
    # read only if Lightning is loaded already: logging a line must not import it
    lightning = sys.modules.get("pytorch_lightning.utilities.rank_zero")
    rank_zero_only = getattr(lightning, "rank_zero_only", None)
    return int(getattr(rank_zero_only, "rank", 0) or 0)


class RankZeroFilter(logging.Filter):
    """Pass a record only on rank zero; the rank is read when the record is emitted, not when the filter is
    made, since Lightning sets the ranks of the processes it starts after they have started."""

    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0


class StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted (pytest's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the stream is always the current sys.stderr
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"[{short_name(record.name)}] {level}{super().format(record)}"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def configure_logging(verbosity: int | str | None = None, *, all_ranks: bool | None = None) -> None:
    """Log the package's records at ``verbosity`` and above to stderr, one line each, on rank zero only.

    ``verbosity`` is ``"debug"``, ``"info"``, ``"warning"``, ``"error"`` or ``-1``..``2``; ``None`` means
    ``$RAG_LOG_LEVEL`` or ``"info"``. ``all_ranks`` lets every DDP rank log; ``None`` means
    ``$RAG_LOG_ALL_RANKS``. Calling it again changes the level and the filter of the one handler it added; the
    ``rag`` logger's records then go to that handler only, not also to the root logger's (Hydra's console).
    """
    if verbosity is None:
        verbosity = os.environ.get(LEVEL_VARIABLE) or "info"
    if all_ranks is None:
        all_ranks = _truthy(os.environ.get(ALL_RANKS_VARIABLE))
    level = parse_level(verbosity)
    logger = logging.getLogger("rag")
    handler = next((h for h in logger.handlers if isinstance(h, StderrHandler)), None)
    if handler is None:
        handler = StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
    for old in [f for f in handler.filters if isinstance(f, RankZeroFilter)]:
        handler.removeFilter(old)
    if not all_ranks:
        handler.addFilter(RankZeroFilter())
    logger.setLevel(level)
    logger.propagate = False


def configure_from_env() -> bool:
    """:func:`configure_logging` if ``$RAG_LOG_LEVEL`` is set (to turn the package's lines on without code);
    returns whether it did. ``rag/__init__.py`` calls it on import, so a value it does not know is a warning
    (one line) and the level ``info``, never an error that stops ``import rag``."""
    value = os.environ.get(LEVEL_VARIABLE)
    if not value:
        return False
    try:
        parse_level(value)
    except ConfigError as err:
        warnings.warn(f"{LEVEL_VARIABLE}={value!r} ignored, logging at info: {err}", stacklevel=2)
        value = "info"
    configure_logging(value)
    return True
