"""Exact maximum inner product search, the reference every recall figure is measured against.

A chunked torch matmul + topk over the corpus: one (B, chunk_rows) score block in memory at a time, ties
at the k-th place broken towards the lower row so that results do not depend on the blocking. The flat
index searches its stored blocks with it; :func:`exact_search` runs it over an array (a memory-mapped
float16 corpus included), and :func:`recall_vs_exact` scores an approximate index against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from rag.retrieval.arrays import (
    DEFAULT_CHUNK_ROWS,
    as_tensor,
    check_matrix,
    check_n_docs,
    iter_chunks,
    rows_of,
    to_float32,
)
from rag.retrieval.errors import RetrievalInputError

if TYPE_CHECKING:
    from rag.retrieval.base import DenseIndex

__all__ = [
    "SCORE_BUDGET_BYTES",
    "exact_search",
    "exact_search_blocks",
    "probe_queries",
    "recall_vs_exact",
]

# Above this many score bytes per block the queries are split, so a big query batch never allocates
# a (B, N) score matrix.
SCORE_BUDGET_BYTES = 256 * 2**20


def _sort_by_score_then_id(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row, highest score first, equal scores by lower id: (B, M) -> (B, k)."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def _topk_block(
    scores: torch.Tensor, k: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:  # (b, n) -> (b, k), (b, k)
    """Top-k of one score block with ties at the k-th place broken towards the lower row, so that the
    result does not depend on how the corpus was cut into blocks."""
    n = scores.shape[1]
    k = min(k, n)
    extra = 1 if k < n else 0
    vals, idx = torch.topk(scores, k + extra, dim=1)  # (b, k+1)
    if extra:
        # torch.topk picks an arbitrary row among equal scores: redo the rare rows tied at the edge.
        tied = (vals[:, k - 1] == vals[:, k]).nonzero().flatten().tolist()
        vals, idx = vals[:, :k].clone(), idx[:, :k].clone()
        for r in tied:
            kth = vals[r, k - 1]
            above = (scores[r] > kth).nonzero().flatten()
            equal = (scores[r] == kth).nonzero().flatten()[: k - above.numel()]
            rows = torch.cat([above, equal])
            idx[r] = rows
            vals[r] = scores[r, rows]
    return vals, idx + offset


def _exact_search_blocks_cpu(
    blocks: Sequence[tuple[int, torch.Tensor]], queries: torch.Tensor, n_docs: int
) -> tuple[np.ndarray, np.ndarray]:
    b = queries.shape[0]
    max_rows = max(blk.shape[0] for _, blk in blocks)
    q_step = max(1, SCORE_BUDGET_BYTES // (4 * max_rows))
    out_scores, out_ids = [], []
    for q0 in range(0, b, q_step):
        q = queries[q0 : q0 + q_step]
        cand_vals, cand_ids = [], []
        for offset, blk in blocks:
            scores = q @ blk.T  # (b, n_i)
            vals, ids = _topk_block(scores, n_docs, offset)  # (b, k)
            cand_vals.append(vals)
            cand_ids.append(ids)
        vals = torch.cat(cand_vals, 1).numpy()  # (b, k * n_blocks)
        ids = torch.cat(cand_ids, 1).numpy()
        vals, ids = _sort_by_score_then_id(vals, ids, n_docs)  # (b, K)
        out_scores.append(vals)
        out_ids.append(ids)
    return (
        np.concatenate(out_scores).astype(np.float32, copy=False),
        np.concatenate(out_ids).astype(np.int64, copy=False),
    )


def _exact_search_blocks_device(
    blocks: Sequence[tuple[int, torch.Tensor]], queries: torch.Tensor, n_docs: int
) -> tuple[np.ndarray, np.ndarray]:
    """GPU variant: scores on the device, block candidates merged on the CPU (ties as on the CPU)."""
    cand_vals, cand_ids = [], []
    for offset, blk in blocks:
        vals, ids = _topk_block(queries @ blk.T, n_docs, offset)  # (B, k)
        cand_vals.append(vals.cpu())
        cand_ids.append(ids.cpu())
    vals, ids = _sort_by_score_then_id(
        torch.cat(cand_vals, 1).numpy(), torch.cat(cand_ids, 1).numpy(), n_docs
    )
    return vals.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def exact_search_blocks(
    blocks: Sequence[tuple[int, torch.Tensor]], queries: torch.Tensor, n_docs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact MIPS of (B, D) float32 queries over (offset, (n_i, D) block) pairs -> (B, K) scores, ids.
    Blocks and queries on a GPU are scored there; the merge is on the CPU either way. Scores are float32
    also inside a bf16/fp16 autocast region (a bf16-mixed training or decoding step): exact means exact."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        if queries.device.type != "cpu":
            return _exact_search_blocks_device(blocks, queries, n_docs)
        return _exact_search_blocks_cpu(blocks, queries, n_docs)


def exact_search(
    embeds, query_embeds, n_docs: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n_docs`` inner product search of query_embeds (B, D) over embeds (N, D), which may be
    a memory-mapped float16 array: one (chunk_rows, D) float32 block in memory at a time.

    Returns doc_scores (B, K) float32 and doc_ids (B, K) int64, ties broken towards the lower row.
    """
    n, dim = check_matrix(embeds, "embeds")
    check_matrix(query_embeds, "query_embeds", dim)
    n_docs = check_n_docs(n_docs, n)
    q = as_tensor(to_float32(query_embeds, "query_embeds"))
    blocks = ((start, as_tensor(blk)) for start, blk in iter_chunks(embeds, chunk_rows, "embeds"))
    # Merge block results as they come so that only one block is held at a time.
    best_s = best_i = None
    for offset, blk in blocks:
        s, i = _exact_search_blocks_cpu([(offset, blk)], q, min(n_docs, blk.shape[0]))
        if best_s is None:
            best_s, best_i = s, i
        else:
            best_s, best_i = _sort_by_score_then_id(
                np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1), n_docs
            )
    return best_s, best_i


# ----------------------------------------------------------------------------------------------------
# Recall against exact search


def probe_queries(embeds, n_probes: int = 256, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """Probe queries for a recall check when no real queries are at hand: corpus rows (spread over the
    whole corpus) plus Gaussian noise of ``noise`` times the row's norm, so that a probe is near its row
    without being it. (n_probes, D) float32."""
    n = embeds.shape[0]
    rng = np.random.default_rng(seed)
    base = rows_of(embeds, np.sort(rng.choice(n, size=min(n_probes, n), replace=False)))
    jitter = rng.standard_normal(base.shape).astype(np.float32)
    jitter *= noise * np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(base.shape[1])
    return base + jitter


def recall_vs_exact(
    index: DenseIndex, embeds_or_exact_index, queries, k: Sequence[int] = (1, 10, 100)
) -> dict[str, float]:
    """Recall@k of ``index`` against exact search on the same queries: the mean over queries of
    |approximate top-k ∩ exact top-k| / k. The reference is an exact `DenseIndex` or the (N, D)
    embeddings themselves (searched exactly, one chunk at a time). k values above the index size are
    skipped. Returns ``{"recall@1": ..., "recall@10": ..., "n_queries": B}``."""
    ks = sorted({int(x) for x in k if int(x) <= index.ntotal})
    if not ks:
        raise RetrievalInputError(f"no k in {tuple(k)} fits an index of {index.ntotal} passages")
    kmax = ks[-1]
    reference = embeds_or_exact_index
    if not isinstance(reference, (np.ndarray, torch.Tensor)) and hasattr(reference, "is_exact"):
        if not reference.is_exact:
            raise RetrievalInputError(
                f"the reference must be exact (a FlatIndex or the embeddings), got a {reference.kind} index"
            )
        _, exact_ids = reference.search(queries, kmax)
    else:
        _, exact_ids = exact_search(reference, queries, kmax)
    _, approx_ids = index.search(queries, kmax)
    out: dict[str, float] = {}
    for kk in ks:
        hits = [len(np.intersect1d(a[:kk][a[:kk] >= 0], e[:kk])) for a, e in zip(approx_ids, exact_ids)]
        out[f"recall@{kk}"] = float(np.mean(hits)) / kk
    out["n_queries"] = len(approx_ids)
    return out
