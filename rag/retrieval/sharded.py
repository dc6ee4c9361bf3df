"""An exact dense index sharded across the ranks of a torch.distributed job (Atlas' layout, inside the
process group Lightning already runs), for corpora larger than one node's memory.

A replicated index makes every node hold the whole corpus (21M x 768 float32: 64.6 GB flat, 70 GB HNSW).
:class:`ShardedIndex` instead gives each of the W ranks one contiguous 1/W of the rows of the same embeddings
files, rows ``[r*N//W, (r+1)*N//W)`` (:func:`rag.retrieval.embed.shard_range`, computed from the total count
alone, so every rank agrees without talking), read from the memory-mapped ``.npy`` files into memory as
float32 or float16. A search is collective, every rank calls it with its own batch:

1. the ranks' query counts are all-gathered (their batches may differ in size, a rank may have none), then
   their queries, padded to the largest batch;
2. each rank searches its shard exactly for the top-K of every rank's queries;
3. the (score, global id) lists go back to the queries' owners (``all_to_all``), which merge them: highest
   score first, equal scores by lower id.

Every rank gets what one exact index over all rows gives. "Exact" needs care here: a BLAS matmul rounds
q·d differently depending on the shapes it is called with (MKL's float32 scores of one query and one row
change in the last bit with the batch size and with where the row sits in its block), so shards searched
with a gathered batch would disagree with a single index in the last bit, and near-ties could swap. So the
matmul only nominates candidates: per shard the top K + ``candidates`` rows by float32 scores, and enough
more that no row outside them can reach the top K given a rigorous bound on the float32 rounding error
(re-searched with more candidates for the rare query where that does not hold). The candidates are then
rescored canonically, q·d accumulated in float64 from the float32 values and rounded to float32, a
function of (q, d) alone, and ranked by that score, ties by lower row. Results are therefore identical,
bit for bit, for every world size, batch split, block size and device, and equal to the true inner
products' ranking wherever two scores differ by more than float32 rounding.

World size 1 (no process group, or a group of one) is a plain local search over all rows. The passages'
text is not moved: each rank reads the passages it retrieved from the corpus, which every rank maps
(the memory-mapped Arrow corpus, ``corpus=arrow``, costs only the pages touched; a corpus read into a Python
list costs every rank the whole list, see :func:`sharded_memory_table`). The retriever reads the retrieved
rows' vectors from the same memory-mapped embeddings files to recompute ``doc_scores`` with the query
encoder's gradient, as it does with a replicated index.

An approximate (HNSW / IVF-PQ) index per shard is not built: every shard is searched exactly.

    index = ShardedIndex().build(open_embeddings(embeddings_dir))   # nothing is read yet
    doc_scores, doc_ids = index.search(query_embeds, n_docs=5)      # collective under DDP
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from rag.retrieval.arrays import DEFAULT_CHUNK_ROWS, check_matrix, check_n_docs, dtype_name, to_float32
from rag.retrieval.embed import (
    DTYPES,
    EmbeddingsError,
    ShardedEmbeddings,
    embed_corpus,
    open_embeddings,
    shard_range,
)
from rag.retrieval.errors import IndexDeviceError, IndexStateError, RetrievalInputError
from rag.retrieval.exact import SCORE_BUDGET_BYTES
from rag.retrieval.memory import DEFAULT_HEADROOM, SKIP_ENV, IndexMemoryError, available_memory_bytes

__all__ = [
    "DEVICES",
    "SearchTraffic",
    "ShardPlan",
    "ShardedIndex",
    "canonical_scores",
    "ensure_embeddings",
    "merge_top_k",
    "shard_plan",
    "sharded_memory_table",
]

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")

#: float32 unit roundoff
_U32 = 2.0**-24
#: rows of a float16 shard converted to float32 at a time while searching (3 MB at D=768: in cache)
_CONVERT_ROWS = 1024


def canonical_scores(query_embeds: np.ndarray, doc_embeds: np.ndarray) -> np.ndarray:
    """q·d for query_embeds (B, D) against doc_embeds (B, C, D), accumulated in float64 from the float32
    values and rounded to float32: (B, C). A function of each (q, d) pair alone (numpy reduces every
    pair's D products in the same order whatever B and C are), unlike a BLAS matmul's float32 result."""
    q = np.asarray(query_embeds, np.float64)[:, None, :]  # (B, 1, D)
    return (q * np.asarray(doc_embeds, np.float64)).sum(-1).astype(np.float32)  # (B, C)


def merge_top_k(doc_scores: np.ndarray, doc_ids: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``n_docs`` of each row of candidates (B, M): highest score first, equal scores by lower id
    (padding, id -1 with score -inf, sorts last)."""
    order = np.lexsort((doc_ids, -doc_scores), axis=-1)[:, :n_docs]
    return np.take_along_axis(doc_scores, order, -1), np.take_along_axis(doc_ids, order, -1)


def _rounding_bound(dim: int, device: torch.device) -> float:
    """A bound, relative to |q| max|d|, on |float32 matmul score - canonical score| for dimension ``dim``:
    the worst-case error of a D-term float32 dot product in any order (gamma_D), the float32 rounding of
    the canonical score, and the inputs' rounding where the GPU may multiply in TF32 / bf16."""
    inputs = 0.0
    if device.type == "cuda":
        precision = torch.get_float32_matmul_precision()
        if torch.backends.cuda.matmul.allow_tf32 or precision == "high":
            inputs = 2.0**-11
        if precision == "medium":
            inputs = 2.0**-8
    gamma = dim * _U32 / (1 - dim * _U32)
    return 1.01 * (gamma + 2 * _U32 + 2 * inputs)


def _distributed(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _rows(source, start: int, end: int) -> np.ndarray:
    # ShardedEmbeddings turns a slice into an arange over all N rows: ask for the rows themselves
    if isinstance(source, ShardedEmbeddings):
        return source[np.arange(start, end)]
    return np.asarray(source[start:end])


def _format_bytes(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


@dataclass
class SearchTraffic:
    """What one collective search moved for this rank: payload bytes sent to and received from the other
    ranks (what the collectives carry, not how their algorithms route it), the queries searched on this
    rank's shard (every rank's) and the seconds the search took."""

    sent_bytes: int = 0
    received_bytes: int = 0
    queries_searched: int = 0
    seconds: float = 0.0


class ShardedIndex:
    """Exact maximum inner product search over N passage embeddings split across the ranks (module doc).

    Args:
        chunk_rows: rows scored per block: bounds the (B, chunk_rows) score block held while searching.
        dtype: how a rank holds its shard: ``float32``, ``float16`` (half the memory; searched in float32,
            1024 rows converted at a time, the same values) or None: as the embeddings are stored.
        device: ``cpu``, or ``cuda``: the shard on the rank's current CUDA device (the one Lightning gave it).
        candidates: rows per shard nominated beyond K by the float32 search before the exact rescoring
            (more are taken when rounding could hide one; the result does not depend on it).
        verbose: progress bar and log line while a shard loads.

    ``build(embeds)`` only records the (N, D) source, a memory-mapped embeddings array (``open_embeddings``) or
    any array; the shard is read at the first search, when the process group (and so this rank's rows) is
    known, and read again if the group changes. ``search`` is collective when the world size is above 1:
    every rank must call it, with the same ``n_docs``.
    """

    kind = "sharded"
    is_exact = True

    def __init__(
        self,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        dtype: str | None = None,
        device: str = "cpu",
        candidates: int = 8,
        verbose: bool = True,
    ):
        if chunk_rows < 1 or candidates < 0:
            raise RetrievalInputError(
                f"chunk_rows must be >= 1 and candidates >= 0, got chunk_rows={chunk_rows}, candidates={candidates}"
            )
        if dtype is not None and dtype not in DTYPES:
            raise RetrievalInputError(
                f"index.dtype must be one of {', '.join(DTYPES)} or null, got {dtype!r}"
            )
        if device not in DEVICES:
            raise RetrievalInputError(f"index.device must be one of {', '.join(DEVICES)}, got {device!r}")
        self.chunk_rows = int(chunk_rows)
        self.dtype = dtype
        self.device = device
        self.candidates = int(candidates)
        self.verbose = bool(verbose)
        #: the process group searched over (None: the default group, Lightning's)
        self.process_group = None
        #: what the last search moved
        self.last_traffic = SearchTraffic()
        self._source = None
        self._shard: torch.Tensor | None = None
        self._placement: tuple[int, int] | None = None  # (rank, world size) the shard was read for
        self._start = 0
        self._max_norm = 0.0

    # -- the DenseIndex surface the retriever uses -----------------------------------------------------

    def params(self) -> dict[str, Any]:
        return {
            "chunk_rows": self.chunk_rows,
            "dtype": self.dtype,
            "device": self.device,
            "candidates": self.candidates,
            "verbose": self.verbose,
        }

    @property
    def ntotal(self) -> int:
        return 0 if self._source is None else int(self._source.shape[0])

    @property
    def dim(self) -> int | None:
        return None if self._source is None else int(self._source.shape[1])

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        where = "" if self._placement is None else f"; rank {self._placement[0]} of {self._placement[1]}"
        rows = "" if self._shard is None else f", shard rows {self.shard_rows}"
        return (
            f"ShardedIndex(chunk_rows={self.chunk_rows}, dtype={self.dtype}, device={self.device}; "
            f"ntotal={self.ntotal}, dim={self.dim}{rows}{where})"
        )

    def build(self, embeds) -> ShardedIndex:
        """Take ``embeds`` (N, D), float32 or float16 (a memmap, ShardedEmbeddings, numpy or torch) as the
        rows to shard. Nothing is read until the first search. Returns self."""
        if isinstance(embeds, torch.Tensor):
            embeds = embeds.detach().cpu().numpy()
        if isinstance(embeds, ShardedEmbeddings):
            n, _ = embeds.shape
            if not np.issubdtype(embeds.dtype, np.floating):
                raise RetrievalInputError(f"embeds must be float32 or float16, got {embeds.dtype}")
        else:
            n, _ = check_matrix(embeds, "embeds")
        if n == 0:
            raise RetrievalInputError("embeds is empty: an index needs at least one passage")
        self._source = embeds
        self._drop_shard()
        return self

    def add(self, embeds) -> None:
        """Append embeds (M, D) as rows ntotal.. (the index hot-swap): the rows so far and the new ones are
        held as one in-memory array from then on (meant for small additions), and the shard is read again."""
        if self._source is None:
            self.build(embeds)
            return
        if isinstance(embeds, torch.Tensor):
            embeds = embeds.detach().cpu().numpy()
        check_matrix(embeds, "embeds", self.dim)
        self.build(np.concatenate([_rows(self._source, 0, self.ntotal), np.asarray(embeds)]))

    def reconstruct(self, doc_ids) -> np.ndarray:
        """The stored vectors of doc_ids (any shape) as float32 (..., D), read from the source rows (any
        rank can: the source is the whole memory-mapped array); id -1 gives zeros."""
        self._require_source()
        ids = np.asarray(doc_ids.cpu() if isinstance(doc_ids, torch.Tensor) else doc_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.max() >= self.ntotal or flat.min() < -1):
            raise RetrievalInputError(f"doc_ids must lie in 0..{self.ntotal - 1} (or -1 for none)")
        out = np.zeros((flat.size, self.dim), np.float32)
        valid = flat >= 0
        if valid.any():
            unique, inverse = np.unique(flat[valid], return_inverse=True)
            out[valid] = np.asarray(self._source[unique], np.float32)[inverse]
        return out.reshape(*ids.shape, self.dim)  # (..., D)

    def memory_bytes(self) -> int:
        """Bytes this rank's shard holds (0 before the first search)."""
        return 0 if self._shard is None else self._shard.numel() * self._shard.element_size()

    # -- the shard --------------------------------------------------------------------------------------

    @property
    def shard_rows(self) -> int:
        return 0 if self._shard is None else int(self._shard.shape[0])

    @property
    def shard_range(self) -> tuple[int, int] | None:
        """Rows [start, end) this rank holds (None before the first search)."""
        return None if self._shard is None else (self._start, self._start + self.shard_rows)

    def load_shard(self, rank: int | None = None, world_size: int | None = None) -> None:
        """Read this rank's rows (of the process group when rank / world_size are not given) into memory,
        unless they are the ones held already. ``search`` calls it."""
        if rank is None or world_size is None:
            rank, world_size = _distributed(self.process_group)
        self._require_source()
        if self._placement == (rank, world_size) and self._shard is not None:
            return
        self._drop_shard()
        start, end = shard_range(self.ntotal, rank, world_size)
        dim = self.dim
        np_dtype = np.dtype(self.dtype or dtype_name(self._source))
        if np_dtype.name not in DTYPES:
            np_dtype = np.dtype(np.float32)
        device = self._torch_device()
        need = (end - start) * dim * np_dtype.itemsize
        self._check_memory(need, rank, world_size, device)
        shard = torch.empty((end - start, dim), dtype=getattr(torch, np_dtype.name))
        rows = shard.numpy()  # the same memory: blocks are written (and cast) in place
        max_sq = 0.0
        started = time.perf_counter()
        with tqdm(
            total=end - start,
            desc=f"loading shard {rank}/{world_size}",
            unit="vec",
            disable=not self.verbose or end - start <= self.chunk_rows,
            leave=False,
        ) as bar:
            for s in range(start, end, self.chunk_rows):
                e = min(s + self.chunk_rows, end)
                block = _rows(self._source, s, e)
                as32 = to_float32(block, "embeds", s)  # refuses NaN / inf, names the row
                rows[s - start : e - start] = block
                max_sq = max(max_sq, float(np.einsum("ij,ij->i", as32, as32, dtype=np.float64).max()))
                bar.update(e - s)
        self._shard = shard.to(device)
        self._start = start
        self._max_norm = math.sqrt(max_sq)
        self._placement = (rank, world_size)
        if self.verbose:
            log.info(
                f"sharded index: rank {rank} of {world_size} holds rows {start:,}..{end - 1:,} of {self.ntotal:,} "
                f"({end - start:,} x {dim} {np_dtype.name}, {_format_bytes(need)} on {device}) in "
                f"{time.perf_counter() - started:.1f} s"
            )

    def _check_memory(self, need: int, rank: int, world_size: int, device: torch.device) -> None:
        skipped = os.environ.get(SKIP_ENV, "1").strip().lower() in ("0", "false", "no", "off")
        if device.type != "cpu" or skipped:
            return
        available = available_memory_bytes()
        if available is None or need + self.chunk_rows * (self.dim or 0) * 4 <= available * DEFAULT_HEADROOM:
            return
        raise IndexMemoryError(
            f"rank {rank} of {world_size} needs {_format_bytes(need)} for its shard of the sharded index but "
            f"{_format_bytes(available)} is available: run on more ranks (trainer.devices / trainer.num_nodes), "
            f"hold the shard in float16 (index.dtype=float16), or set {SKIP_ENV}=0 to try anyway"
        )

    def _torch_device(self) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise IndexDeviceError("index.device=cuda but torch sees no CUDA device: use index.device=cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def _drop_shard(self) -> None:
        self._shard = None
        self._placement = None
        self._start = 0
        self._max_norm = 0.0

    def _require_source(self) -> None:
        if self._source is None:
            raise IndexStateError("the sharded index has no embeddings: call build(embeds) first")

    # -- search -----------------------------------------------------------------------------------------

    def search(self, query_embeds, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n_docs`` rows by inner product for this rank's query_embeds (B, D), numpy or torch, over
        all N rows of every shard: doc_scores (B, K) float32 (canonical inner products, best first) and
        doc_ids (B, K) int64, equal scores by lower id. Collective: every rank of the group calls it (B may
        differ between ranks and may be 0)."""
        started = time.perf_counter()
        self._require_source()
        rank, world = _distributed(self.process_group)
        if world == 1:
            self.load_shard(0, 1)
            check_matrix(query_embeds, "query_embeds", self.dim)
            n_docs = check_n_docs(n_docs, self.ntotal)
            queries = to_float32(query_embeds, "query_embeds")
            out = self.search_shard(queries, n_docs)
            self.last_traffic = SearchTraffic(0, 0, queries.shape[0], time.perf_counter() - started)
            return out
        return self._search_distributed(query_embeds, n_docs, rank, world, started)

    def _search_distributed(self, query_embeds, n_docs, rank: int, world: int, started: float):
        group = self.process_group
        comm = self._comm_device()
        failure: BaseException | None = None
        queries = np.zeros((0, self.dim), np.float32)
        try:
            self.load_shard(rank, world)
            check_matrix(query_embeds, "query_embeds", self.dim)
            n_docs = check_n_docs(n_docs, self.ntotal)
            queries = to_float32(query_embeds, "query_embeds")
        except Exception as err:  # noqa: BLE001 - told to every rank below, so that none waits in a collective
            failure = err
        b, dim = queries.shape
        # 1. every rank's query count, n_docs and whether it is ready
        head = torch.tensor(
            [b, n_docs if isinstance(n_docs, int) else -1, int(failure is not None)], device=comm
        )
        heads = [torch.empty_like(head) for _ in range(world)]
        dist.all_gather(heads, head, group=group)
        table = torch.stack(heads).cpu().numpy()  # (W, 3)
        if failure is not None:
            raise failure
        bad = np.flatnonzero(table[:, 2])
        if bad.size:
            raise IndexStateError(
                f"rank {int(bad[0])} could not search its shard of the sharded index (its log says why)"
            )
        if len(set(table[:, 1].tolist())) > 1:
            raise RetrievalInputError(
                f"the ranks searched the sharded index with different n_docs ({sorted(set(table[:, 1].tolist()))}): "
                "every rank must ask for the same number of passages"
            )
        sizes = table[:, 0].tolist()
        if not any(sizes):
            self.last_traffic = SearchTraffic(seconds=time.perf_counter() - started)
            return np.zeros((0, n_docs), np.float32), np.zeros((0, n_docs), np.int64)
        # 2. every rank's queries, padded to the largest batch
        padded = torch.zeros((max(sizes), dim), dtype=torch.float32, device=comm)
        padded[:b] = torch.from_numpy(queries).to(comm)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        all_queries = torch.cat([g[:s] for g, s in zip(gathered, sizes)]).cpu().numpy()  # (B_total, D)
        # 3. this shard's top-K of every query, back to each query's owner
        scores, ids = self.search_shard(all_queries, n_docs)  # (B_total, K)
        packed = np.stack([scores.astype(np.float64), ids.astype(np.float64)], -1)  # (B_total, K, 2)
        received = torch.empty((world * b, n_docs, 2), dtype=torch.float64, device=comm)
        dist.all_to_all_single(
            received,
            torch.from_numpy(packed).to(comm),
            output_split_sizes=[b] * world,
            input_split_sizes=sizes,
            group=group,
        )
        parts = received.cpu().numpy().reshape(world, b, n_docs, 2).transpose(1, 0, 2, 3)  # (B, W, K, 2)
        parts = parts.reshape(b, world * n_docs, 2)
        result_scores, result_ids = merge_top_k(
            parts[..., 0].astype(np.float32), parts[..., 1].astype(np.int64), n_docs
        )
        # payload to / from the other ranks: the header and padded queries to each, the results of their
        # queries to them; from each, its header, queries and its results for this rank's queries
        gathered_bytes = (head.numel() * 8 + padded.numel() * 4) * (world - 1)
        row = n_docs * 16
        self.last_traffic = SearchTraffic(
            sent_bytes=int(gathered_bytes + (sum(sizes) - b) * row),
            received_bytes=int(gathered_bytes + (world - 1) * b * row),
            queries_searched=len(all_queries),
            seconds=time.perf_counter() - started,
        )
        return result_scores.astype(np.float32, copy=False), result_ids.astype(np.int64, copy=False)

    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo (and MPI) CPU ones
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def search_shard(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-``n_docs`` of this rank's shard for float32 queries (B, D), with global ids; rows
        beyond the shard's size (a shard smaller than K) are padding: score -inf, id -1. Local, no
        collective (:meth:`search` is the whole-index search)."""
        if self._shard is None:
            self.load_shard()
        b = queries.shape[0]
        rows = self.shard_rows
        out_scores = np.full((b, n_docs), -np.inf, np.float32)
        out_ids = np.full((b, n_docs), -1, np.int64)
        k = min(n_docs, rows)
        if b == 0 or k == 0:
            return out_scores, out_ids
        device = self._shard.device
        slack = (
            _rounding_bound(self.dim, device)
            * np.linalg.norm(queries.astype(np.float64), axis=1)
            * self._max_norm
        )
        todo = np.arange(b)
        m = min(rows, k + self.candidates)
        while todo.size:
            vals, idx = self._nominate(queries[todo], m)  # (b', m) float32 scores, local rows, best first
            if m < rows:
                # no row outside the m nominated can reach the top k: its float32 score is at most the m-th,
                # and the k-th canonical score is at least the k-th float32 score minus the rounding bound
                threshold = vals[:, k - 1].astype(np.float64) - 2 * slack[todo]
                complete = vals[:, m - 1].astype(np.float64) < threshold
            else:
                complete = np.ones(len(todo), bool)
            done = todo[complete]
            if done.size:
                cand = idx[complete]  # (b'', m)
                vectors = self._shard[torch.from_numpy(cand.reshape(-1)).to(device)]
                vectors = vectors.to("cpu", torch.float32).numpy().reshape(*cand.shape, -1)  # (b'', m, D)
                scores = canonical_scores(queries[done], vectors)  # (b'', m)
                top_scores, top_ids = merge_top_k(scores, cand, k)
                out_scores[done, :k] = top_scores
                out_ids[done, :k] = top_ids + self._start
            todo = todo[~complete]
            m = min(rows, 2 * m)
        return out_scores, out_ids

    def _nominate(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The m best rows of the shard by float32 matmul scores (any order among float32 ties)."""
        shard = self._shard
        q_all = torch.from_numpy(np.ascontiguousarray(queries)).to(shard.device)
        q_step = max(1, SCORE_BUDGET_BYTES // (4 * min(self.chunk_rows, shard.shape[0])))
        out_vals, out_idx = [], []
        for q0 in range(0, q_all.shape[0], q_step):
            q = q_all[q0 : q0 + q_step]
            cand_vals, cand_idx = [], []
            for offset in range(0, shard.shape[0], self.chunk_rows):
                block = shard[offset : offset + self.chunk_rows]
                if block.dtype == torch.float32:
                    scores = q @ block.T  # (b, n)
                else:
                    # converted in cache-sized pieces: one conversion of the whole block would write and
                    # read it back through memory, costing more than the matmul itself
                    pieces = range(0, block.shape[0], _CONVERT_ROWS)
                    scores = torch.cat([q @ block[o : o + _CONVERT_ROWS].float().T for o in pieces], 1)
                vals, idx = torch.topk(scores, min(m, block.shape[0]), dim=1)  # (b, m)
                cand_vals.append(vals)
                cand_idx.append(idx + offset)
            vals, idx = torch.cat(cand_vals, 1), torch.cat(cand_idx, 1)  # (b, m * blocks)
            if vals.shape[1] > m:
                vals, pick = torch.topk(vals, m, dim=1)
                idx = idx.gather(1, pick)
            out_vals.append(vals.cpu())
            out_idx.append(idx.cpu())
        return torch.cat(out_vals).numpy(), torch.cat(out_idx).numpy()


# ---------------------------------------------------------------------------------------------- embeddings


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created): the ranks of one job that embed into one folder take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def ensure_embeddings(
    passages: Sequence,
    doc_encoder,
    embeddings_dir: str | os.PathLike,
    *,
    embed: dict | None = None,
    prebuilt: Sequence[str | os.PathLike] | None = None,
):
    """The (N, D) embeddings of ``passages`` by ``doc_encoder`` in ``embeddings_dir``, memory-mapped: what a
    :class:`ShardedIndex` shards. Missing files are embedded first (:func:`rag.retrieval.embed.embed_corpus`
    with ``embed``'s options; files made by another encoder or from other passages are refused), one
    process at a time (a lock beside the folder), so that the first rank of a job embeds and the others find
    the files done. ``prebuilt``: as :func:`rag.retrieval.indexer.ensure_index` (None: the mini-wiki's
    shipped embeddings). None when ``embed`` embeds one machine's shard (num_shards > 1) and others are
    still missing."""
    from rag.data import miniwiki

    embed = dict(embed or {})
    directory = Path(embeddings_dir).expanduser()
    if prebuilt is None:
        prebuilt = [miniwiki.embeddings_dir()]
    with _exclusive(directory.with_name(f".{directory.name}.lock")):
        report = embed_corpus(doc_encoder, passages, directory, prebuilt=prebuilt, **embed)
    if report.computed:
        log.info(f"embedded {sum(hi - lo for lo, hi in report.computed):,} passages into {directory}")
    try:
        return open_embeddings(directory, expected_rows=len(passages))
    except EmbeddingsError:
        if embed.get("num_shards", 1) > 1:
            return None
        raise


# ---------------------------------------------------------------------------------------------- memory plan


@dataclass
class ShardPlan:
    """Per-rank memory and traffic of a :class:`ShardedIndex` over N x D at one world size and dtype."""

    n: int
    dim: int
    world_size: int
    dtype: str
    shard_rows: int  # the largest shard's rows (ceil(N / W))
    shard_bytes: int  # the largest shard's vectors
    search_bytes: int  # held while searching: one score block (and a float16 shard's converted rows)
    sent_bytes: int  # payload per search, per rank (queries_per_rank queries on every rank, K = n_docs)
    received_bytes: int
    replicated_bytes: int  # what every rank holds (or maps) with a replicated flat index: 4 N D


def shard_plan(
    n: int,
    dim: int,
    world_size: int,
    dtype: str = "float32",
    *,
    queries_per_rank: int = 8,
    n_docs: int = 5,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ShardPlan:
    """What each rank holds and moves with the index sharded over ``world_size`` ranks (see ShardPlan)."""
    if dtype not in DTYPES:
        raise RetrievalInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if n < 1 or dim < 1 or world_size < 1:
        raise RetrievalInputError(f"need n, dim, world_size >= 1, got {n}, {dim}, {world_size}")
    rows = -(-n // world_size)
    itemsize = np.dtype(dtype).itemsize
    block = min(chunk_rows, rows)
    total_queries = queries_per_rank * world_size
    search = total_queries * block * 4 + (min(_CONVERT_ROWS, rows) * dim * 4 if dtype == "float16" else 0)
    others = world_size - 1
    head = 3 * 8 * others
    queries = queries_per_rank * dim * 4 * others
    return ShardPlan(
        n=n,
        dim=dim,
        world_size=world_size,
        dtype=dtype,
        shard_rows=rows,
        shard_bytes=rows * dim * itemsize,
        search_bytes=search,
        sent_bytes=head + queries + others * queries_per_rank * n_docs * 16,
        received_bytes=head + queries + others * queries_per_rank * n_docs * 16,
        replicated_bytes=4 * n * dim,
    )


def sharded_memory_table(
    n: int,
    dim: int,
    world_sizes: Sequence[int] = (8, 64),
    dtypes: Sequence[str] = ("float32", "float16"),
    *,
    ranks_per_node: int = 8,
    queries_per_rank: int = 8,
    n_docs: int = 5,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> str:
    """A printable per-rank table of the sharded index over ``n`` x ``dim`` for each world size and dtype:
    the shard's rows and bytes, the search's working memory, the node's total at ``ranks_per_node`` ranks
    per node, and the bytes a search moves per rank (``queries_per_rank`` queries each, K = ``n_docs``),
    against the replicated flat index that every node holds whole."""
    head = (
        f"sharded index plan for {n:,} vectors x {dim} ({ranks_per_node} ranks per node; a search of "
        f"{queries_per_rank} queries per rank, K={n_docs}); replicated flat index: "
        f"{_format_bytes(4 * n * dim)} per node"
    )
    rows = [
        head,
        f"  {'ranks':>5} {'dtype':>7} {'rows/rank':>11} {'shard/rank':>11} {'search/rank':>12} "
        f"{'per node':>10} {'sent/search':>12} {'recv/search':>12}",
    ]
    for world in world_sizes:
        for dtype in dtypes:
            p = shard_plan(
                n, dim, world, dtype, queries_per_rank=queries_per_rank, n_docs=n_docs, chunk_rows=chunk_rows
            )
            node = min(ranks_per_node, world) * (p.shard_bytes + p.search_bytes)
            rows.append(
                f"  {world:>5} {dtype:>7} {p.shard_rows:>11,} {_format_bytes(p.shard_bytes):>11} "
                f"{_format_bytes(p.search_bytes):>12} {_format_bytes(node):>10} "
                f"{_format_bytes(p.sent_bytes):>12} {_format_bytes(p.received_bytes):>12}"
            )
    rows += [
        "  beside the shard, every rank maps (page cache, shared by a node's ranks, only touched pages "
        "resident): the embeddings files",
        "  (the retrieved rows' vectors for the doc scores' gradient) and the corpus text of the passages "
        "it retrieved (corpus=arrow);",
        "  a corpus read into a Python list (corpus=file) is held whole by every rank instead",
    ]
    return "\n".join(rows)
