"""The non-parametric memory: encoders, corpus embedding, FAISS / BM25 indexes and the retriever."""

from rag.retrieval.base import DenseIndex
from rag.retrieval.bm25 import BM25Index
from rag.retrieval.embed import embed_corpus, open_embeddings
from rag.retrieval.encoders import DocumentEncoder, QueryEncoder, load_document_encoder, load_query_encoder
from rag.retrieval.index import make_index
from rag.retrieval.manifest import IndexManifest
from rag.retrieval.retriever import BM25Retriever, DenseRetriever

__all__ = [
    "BM25Index",
    "BM25Retriever",
    "DenseIndex",
    "DenseRetriever",
    "DocumentEncoder",
    "IndexManifest",
    "QueryEncoder",
    "embed_corpus",
    "load_document_encoder",
    "load_query_encoder",
    "make_index",
    "open_embeddings",
]
