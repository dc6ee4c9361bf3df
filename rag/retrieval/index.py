"""Dense indexes for maximum inner product search over passage embeddings (paper §2.2).

p(z|x) ∝ exp(d(z)·q(x)): retrieval is a top-K maximum inner product search of the query embedding
q(x) (B, D) against the N document embeddings d(z) (N, D). Four kinds, each a class built by Hydra from
``conf/index/<kind>.yaml``:

- ``flat`` (`FlatIndex`): exact search, a chunked torch matmul + topk. The reference for every recall
  figure and the default for small corpora.
- ``hnsw`` (`HNSWIndex`): faiss HNSW graph over the full vectors, the paper's choice (DPR's M=512,
  efSearch=128, efConstruction=200 served 21M passages; the shipped config picks smaller M, see
  ``conf/index/hnsw.yaml``).
- ``hnsw_sq8`` (`HNSWSQ8Index`): the same graph over 8-bit scalar-quantised vectors, d + 8M bytes each.
- ``ivfpq`` (`IVFPQIndex`): an inverted file with product-quantised codes, <= 100 bytes per vector (the
  only way 21M passages fit in 24 GB, as transformers' "compressed" wiki index).
- ``ivfpq_refine`` (`IVFPQRefineIndex`): the same codes in memory, their top ``k_factor * n_docs``
  candidates re-scored exactly from the memory-mapped embeddings on disk (recall@10 >= 0.95).

Every index: ``build(embeds)``, ``add(embeds)``, ``search(query_embeds, n_docs) -> (doc_scores, doc_ids)``
with true inner products as scores and corpus rows 0..N-1 as ids, ``reconstruct(doc_ids)``, ``ntotal``,
``dim``, ``memory_bytes()``, ``save(directory, manifest)`` and ``DenseIndex.load(directory, expected)``.
Building an approximate index logs its recall against exact search, because approximate search costs
accuracy silently (transformers RAG users lost up to 17 EM points to a badly set index,
huggingface/transformers#8285).

The index lives on the CPU and uses the threads the caller set (``faiss.omp_set_num_threads``,
``torch.set_num_threads``); nothing here changes them.

This module is the public face of the indexes and their registry; the code lives by concern in
:mod:`~rag.retrieval.manifest` (the saved manifest and its checks), :mod:`~rag.retrieval.arrays` (input
checks, chunking), :mod:`~rag.retrieval.exact` (exact search, recall against it), :mod:`~rag.retrieval.base`
(`DenseIndex`: build, search, save, load, memory estimate) and :mod:`~rag.retrieval.kinds` (the four kinds).
"""

from __future__ import annotations

from rag.retrieval.arrays import DEFAULT_CHUNK_ROWS
from rag.retrieval.base import INDEX_KINDS, DenseIndex, MemoryEstimate, kind_class
from rag.retrieval.exact import SCORE_BUDGET_BYTES, exact_search, probe_queries, recall_vs_exact
from rag.retrieval.kinds import FlatIndex, HNSWIndex, HNSWSQ8Index, IVFPQIndex, IVFPQRefineIndex
from rag.retrieval.manifest import FORMAT_VERSION, MANIFEST_NAME, METRIC, IndexManifest, read_manifest

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FORMAT_VERSION",
    "INDEX_KINDS",
    "MANIFEST_NAME",
    "METRIC",
    "SCORE_BUDGET_BYTES",
    "DenseIndex",
    "FlatIndex",
    "HNSWIndex",
    "HNSWSQ8Index",
    "IVFPQIndex",
    "IVFPQRefineIndex",
    "IndexManifest",
    "MemoryEstimate",
    "estimate_memory_bytes",
    "exact_search",
    "kind_class",
    "make_index",
    "probe_queries",
    "read_manifest",
    "recall_vs_exact",
]


def make_index(kind: str, **params) -> DenseIndex:
    """An empty index of ``kind`` ("flat", "hnsw", "hnsw_sq8", "ivfpq") with its constructor params."""
    return DenseIndex.create(kind, **params)


def estimate_memory_bytes(kind: str, n: int, dim: int, **params) -> int:
    """Bytes an index of ``kind`` will hold for n vectors of dimension dim, before building it (within a
    few percent of ``memory_bytes()`` after the build). Building needs at most one ``chunk_rows`` block
    (and the doubling of faiss' graph vector) beyond it; :meth:`DenseIndex.memory_estimate` adds that."""
    return kind_class(kind).estimate_memory_bytes(n, dim, **params)
