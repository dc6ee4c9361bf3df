"""rag: Retrieval-Augmented Generation (Lewis et al. 2020, arXiv 2005.11401)."""

from rag.types import Passage, Question, RetrievalOutput

__all__ = ["Passage", "Question", "RetrievalOutput"]
__version__ = "0.1.0"
