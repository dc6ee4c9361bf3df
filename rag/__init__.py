"""rag: Retrieval-Augmented Generation (Lewis et al. 2020, arXiv 2005.11401).

The Python API (:mod:`rag.api`), each step one call::

    import rag

    model = rag.load("reference")                          # or rag.RAG.from_pretrained(...)
    answers = model.generate(["Who wrote Hamlet?"], n_docs=5)
    model.explain(["Who wrote Hamlet?"], [answers[0].answer])
    model.index(["Your own passage ..."], "my_index")      # retrieve from your passages
    model.encode_query(["Who wrote Hamlet?"])              # (N, D)
"""

from typing import TYPE_CHECKING

from rag.errors import ConfigError, RagError
from rag.log import configure_from_env as _configure_logging_from_env
from rag.types import Passage, Question, RetrievalOutput

if TYPE_CHECKING:
    from rag.api import RAG, ApiError, Explanation, PassageIndex, RagAnswer, as_passages, load

# no handler unless RAG_LOG_LEVEL asks for one: a Python user sees the package's warnings (Python's
# last-resort handler) and none of its progress lines; the commands call rag.log.configure_logging
_configure_logging_from_env()

#: the API's names, imported on first use: ``import rag.types`` (or any light module) need not load
#: torch's model stack, Hydra and Lightning
_API = ("RAG", "ApiError", "Explanation", "PassageIndex", "RagAnswer", "as_passages", "load")


def __getattr__(name: str):
    if name in _API:
        import rag.api

        return getattr(rag.api, name)
    raise AttributeError(f"module 'rag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = [
    "RAG",
    "ApiError",
    "ConfigError",
    "Explanation",
    "Passage",
    "PassageIndex",
    "Question",
    "RagAnswer",
    "RagError",
    "RetrievalOutput",
    "as_passages",
    "load",
]
__version__ = "0.1.0"
