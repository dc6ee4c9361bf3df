"""The index kinds: exact ``flat`` (torch), faiss' ``hnsw``, ``hnsw_sq8`` and ``ivfpq``, and ``ivfpq_refine``
(IVF-PQ whose candidates are re-scored exactly from the memory-mapped embeddings on disk).

Each kind is a `DenseIndex` built by Hydra from ``conf/index/<kind>.yaml``; its constructor holds its default
parameters, and it answers what it will hold for N vectors of dimension D before it is built
(:meth:`DenseIndex.memory_estimate`), which :mod:`rag.retrieval.memory` tabulates.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import torch

from rag.retrieval.arrays import DEFAULT_CHUNK_ROWS, as_tensor, iter_chunks, rows_of, to_float32
from rag.retrieval.base import DenseIndex, IndexEmbeddingsError, require_faiss_gpu
from rag.retrieval.errors import IndexCorruptError, IndexDeviceError, IndexStateError, RetrievalInputError
from rag.retrieval.exact import exact_search_blocks
from rag.retrieval.manifest import (
    MANIFEST_NAME,
    IndexManifest,
    array_fingerprint,
    embeddings_part_record,
    rebuild_hint,
)

__all__ = ["REFINE_BUFFER_BYTES", "FlatIndex", "HNSWIndex", "HNSWSQ8Index", "IVFPQIndex", "IVFPQRefineIndex"]


# ----------------------------------------------------------------------------------------------------
# Exact flat index


class FlatIndex(DenseIndex):
    """Exact inner product search: a torch matmul + topk over the corpus in blocks of ``chunk_rows``.

    faiss' IndexFlatIP answers small query batches several times slower than one BLAS matmul (measured
    by scripts/bench_index.py), so the exact path is torch: it stays within a few percent of a bare
    matmul + topk over the whole matrix while holding at most one (B, chunk_rows) score block at a time.
    Vectors are stored as float32 blocks so that ``add`` appends without copying what is there. Equal
    scores come back in row order, so results do not depend on the blocking."""

    kind = "flat"
    is_exact = True
    plan_rank = 4  # exact, but slow at scale: recommended last

    def __init__(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, recall_probes: int = 0, verbose: bool = True):
        super().__init__(chunk_rows=chunk_rows, recall_probes=recall_probes, verbose=verbose)
        self._blocks: list[torch.Tensor] = []
        self._device: torch.device = torch.device("cpu")

    @property
    def ntotal(self) -> int:
        return sum(b.shape[0] for b in self._blocks)

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._blocks)

    def _index_bytes(self, n: int, dim: int) -> int:
        return 4 * n * dim

    def _reset(self, dim: int) -> None:
        self._blocks = []

    def _clear(self) -> None:
        self._blocks = []

    def _add_block(self, block: np.ndarray) -> None:
        rows = as_tensor(block).to(self._device)
        # Top up the last block first so that every block but the last is full: reconstruct() finds a
        # row by division, and search does few large matmuls rather than many small ones.
        if self._blocks and self._blocks[-1].shape[0] < self.chunk_rows:
            room = self.chunk_rows - self._blocks[-1].shape[0]
            self._blocks[-1] = torch.cat([self._blocks[-1], rows[:room]])
            rows = rows[room:]
        for start in range(0, rows.shape[0], self.chunk_rows):
            self._blocks.append(rows[start : start + self.chunk_rows].clone())

    def _search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        q = as_tensor(queries).to(self._device)
        offsets = np.cumsum([0] + [b.shape[0] for b in self._blocks[:-1]]).tolist()
        return exact_search_blocks(list(zip(offsets, self._blocks)), q, n_docs)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((ids.size, self._dim), np.float32)
        for b in np.unique(ids // self.chunk_rows):
            sel = ids // self.chunk_rows == b
            rows = torch.from_numpy(ids[sel] - b * self.chunk_rows)
            out[sel] = self._blocks[b][rows.to(self._device)].cpu().numpy()
        return out

    def embeddings(self) -> Iterator[torch.Tensor]:
        """The stored (n_i, D) float32 blocks in row order."""
        yield from self._blocks

    def _data_suffix(self) -> str:
        return ".npy"

    def _save_data(self, path: Path) -> None:
        with open(path, "wb") as f:
            # Written block by block so that saving needs no second copy of the corpus.
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (self.ntotal, self._dim)}
            )
            for blk in self._blocks:
                f.write(np.ascontiguousarray(blk.cpu().numpy(), dtype="<f4").tobytes())

    def _load_data(self, path: Path, manifest: IndexManifest) -> None:
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 2 or arr.shape[1] != manifest.dim or arr.dtype != np.float32:
            raise ValueError(f"stored array has shape {arr.shape} and dtype {arr.dtype}")
        self._blocks = []
        for start in range(0, arr.shape[0], self.chunk_rows):
            block = arr[start : start + self.chunk_rows]
            if self._read_only:
                with warnings.catch_warnings():
                    # torch cannot mark a tensor read-only; nothing here writes to the stored blocks
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    self._blocks.append(torch.from_numpy(block))
            else:
                self._blocks.append(torch.from_numpy(to_float32(block, "stored embeddings", start).copy()))

    def to_gpu(self, device: int = 0) -> FlatIndex:
        """Move the stored vectors to CUDA device ``device`` (torch, so faiss' GPU build is not needed)."""
        if not torch.cuda.is_available():
            raise IndexDeviceError("no CUDA device is visible to torch: keep the flat index on the CPU")
        self._device = torch.device("cuda", device)
        self._blocks = [b.to(self._device) for b in self._blocks]
        return self


# ----------------------------------------------------------------------------------------------------
# faiss-backed approximate indexes


_MIPS_CHOICES = ("ip", "l2")


class _FaissIndex(DenseIndex):
    """Shared plumbing of the faiss kinds: chunked adds, the MIPS transform, save/load, accounting."""

    def __init__(self, mips: str = "ip", max_norm: float | None = None, **common):
        super().__init__(**common)
        if mips not in _MIPS_CHOICES:
            raise RetrievalInputError(f"mips must be one of {_MIPS_CHOICES}, got {mips!r}")
        self.mips = mips
        self.max_norm = None if max_norm is None else float(max_norm)
        self._index: faiss.Index | None = None
        self._phi = 0.0  # squared norm bound of the L2 trick

    def params(self) -> dict[str, Any]:
        return {**super().params(), "mips": self.mips, "max_norm": self.max_norm}

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying faiss index (for inspection and benchmarks)."""
        self._require_built()
        return self._index

    def _new_faiss_index(self, dim: int) -> faiss.Index:
        raise NotImplementedError

    def _needs_training(self) -> bool:
        return False

    def _train_size(self, n: int) -> int:
        return n

    def _reset(self, dim: int) -> None:
        self._index = self._new_faiss_index(dim + (1 if self.mips == "l2" else 0))
        self._phi = 0.0

    def _clear(self) -> None:
        self._index = None
        self._gpu_index = None
        self._phi = 0.0

    def _prepare(self, embeds) -> None:
        if self.mips == "l2":
            # DPR's reduction of MIPS to L2 search (Bachrach et al. 2014): x -> [x, sqrt(phi - |x|^2)],
            # q -> [q, 0], so |q' - x'|^2 = |q|^2 + phi - 2 q·x. phi must bound every |x|^2, now and
            # for later adds, hence the pass over the norms before anything goes in.
            phi = 0.0
            for _, block in iter_chunks(embeds, self.chunk_rows, "embeds"):
                phi = max(phi, float(np.einsum("ij,ij->i", block, block, dtype=np.float64).max()))
            if self.max_norm is not None:
                phi = max(phi, self.max_norm**2)
            self._phi = phi
        if self._needs_training():
            sample = _training_sample(embeds, self._train_size(embeds.shape[0]))
            self._index.train(self._transform_rows(sample))

    def _check_new_rows(self, block: np.ndarray, first_row: int) -> None:
        if self.mips == "l2":
            sq = np.einsum("ij,ij->i", block, block, dtype=np.float64)
            over = np.flatnonzero(sq > self._phi * (1 + 1e-6))
            if over.size:
                raise IndexStateError(
                    f"row {first_row + int(over[0])} has squared norm {sq[over[0]]:.4g}, above the bound "
                    f"{self._phi:.4g} this L2-trick index was built with: rebuild it over all vectors, or "
                    "build with max_norm set to the largest norm you will add (or use mips='ip')"
                )

    def _transform_rows(self, block: np.ndarray) -> np.ndarray:
        if self.mips == "ip":
            return block
        sq = np.einsum("ij,ij->i", block, block, dtype=np.float64)
        out = np.empty((block.shape[0], block.shape[1] + 1), np.float32)  # (n, D+1)
        out[:, :-1] = block
        out[:, -1] = np.sqrt(np.maximum(self._phi - sq, 0.0))
        return out

    def _add_block(self, block: np.ndarray) -> None:
        self._index.add(self._transform_rows(block))

    def _search_params(self, n_docs: int):
        return None

    def _faiss_search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(queries, n_docs, params=self._search_params(n_docs))

    def _search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mips == "l2":
            qa = np.zeros((queries.shape[0], queries.shape[1] + 1), np.float32)  # (B, D+1)
            qa[:, :-1] = queries
        else:
            qa = queries
        dist, ids = self._faiss_search(qa, n_docs)  # (B, K)
        if self.mips == "l2":
            q_sq = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)[:, None]
            scores = ((q_sq + self._phi - dist.astype(np.float64)) / 2).astype(np.float32)
        else:
            scores = dist
        self._mark_missing(scores, ids, n_docs)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def _mark_missing(self, scores: np.ndarray, ids: np.ndarray, n_docs: int) -> None:
        """Score -inf where faiss found no passage (id -1), and warn that it happened."""
        missing = ids < 0
        if missing.any():
            scores[missing] = -np.inf
            warnings.warn(
                f"the {self.kind} index found fewer than n_docs={n_docs} passages for "
                f"{int(missing.any(1).sum())} of {len(ids)} queries (ids -1): raise {self._recall_knob()}",
                stacklevel=4,
            )

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self._index.reconstruct_batch(ids)[:, : self._dim]

    def _state(self) -> dict[str, Any]:
        return {"phi": self._phi}

    def _save_data(self, path: Path) -> None:
        faiss.write_index(self._index, str(path))

    _MMAP_FLAG: ClassVar[int] = faiss.IO_FLAG_MMAP_IFC  # maps IndexFlatCodes' codes (HNSW storage)

    def _load_data(self, path: Path, manifest: IndexManifest) -> None:
        index = faiss.read_index(
            str(path), self._MMAP_FLAG | faiss.IO_FLAG_READ_ONLY if self._read_only else 0
        )
        expected_d = manifest.dim + (1 if self.mips == "l2" else 0)
        if index.d != expected_d:
            raise ValueError(f"faiss index has dimension {index.d}, expected {expected_d}")
        self._index = index
        self._phi = float(manifest.state.get("phi", 0.0))
        self._after_load()

    def _after_load(self) -> None:
        pass


def _training_sample(embeds, size: int, seed: int = 0) -> np.ndarray:
    """Up to ``size`` rows spread over the corpus (sorted, so a memmap reads forward)."""
    n = embeds.shape[0]
    if size >= n:
        return rows_of(embeds, np.arange(n))
    return rows_of(embeds, np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)))


def _divisors_near(n: int, target: int) -> list[int]:
    """The divisors of n, nearest to target first (the smaller of two equally near)."""
    return sorted((x for x in range(1, n + 1) if n % x == 0), key=lambda x: abs(x - target))


def _hnsw_link_bytes(m: int) -> float:
    """Graph bytes per vector in faiss' HNSW: 2M level-0 links, M links on each upper level (a vector
    reaches level l with probability M^-l, so 1/(M-1) upper levels on average), 4 bytes each, plus its
    offset (8) and level (4)."""
    return 4 * (2 * m + m / (m - 1)) + 12


class HNSWIndex(_FaissIndex):
    """faiss HNSW graph over the full float32 vectors: approximate MIPS, the paper's index.

    Maximum inner product either directly (``mips="ip"``: faiss' METRIC_INNER_PRODUCT) or through DPR's
    extra-dimension L2 trick (``mips="l2"``: x -> [x, sqrt(phi - |x|^2)], q -> [q, 0]). The default is
    ``ip`` because it measured as good or better everywhere:
    - on unit vectors the two are the same search (the extra coordinate is constant): at 100k x 768
      both gave recall@10 0.916 at the same speed (scripts/bench_index.py, M=32, efC=80, efS=128);
    - with unequal norms, as DPR's unnormalised embeddings have, the L2 trick's graph strands queries:
      on 30k clustered 128-d vectors with log-normal norms (sd 0.3) recall@10 fell to 0.667 against
      0.996 for ``ip`` (sd 0.1: 0.995 against 0.988; 2,000 x 32-d, sd 0.3: 0.865 against 0.982);
    - ``ip`` needs no extra dimension, no augmented copy of each block, and no norm bound that a later
      ``add`` could exceed.
    Scores are inner products either way (the L2 trick's distances are converted back in float64).
    The defaults (M=32, efConstruction=200, efSearch=192) reach recall@10 0.970 at 100k x 768; see
    conf/index/hnsw.yaml for the measurements behind them.

    Args:
        m: graph degree (faiss' M; DPR used 512 at 21M passages). Memory per vector is 4D + 8M bytes.
        ef_construction: candidate list while building (DPR: 200).
        ef_search: candidate list while searching (DPR: 128); raised to n_docs when n_docs is larger.
        mips: "ip" or "l2", see above.
        max_norm: L2 trick only: the largest vector norm the index must accept (for later ``add``).
    """

    kind = "hnsw"
    plan_rank = 0  # the full vectors: the most accurate approximate kind

    def __init__(
        self,
        m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 192,
        mips: str = "ip",
        max_norm: float | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        recall_probes: int = 256,
        verbose: bool = True,
    ):
        super().__init__(
            mips=mips, max_norm=max_norm, chunk_rows=chunk_rows, recall_probes=recall_probes, verbose=verbose
        )
        if m < 2 or ef_construction < 1 or ef_search < 1:
            raise RetrievalInputError(
                f"HNSW needs m >= 2, ef_construction >= 1 and ef_search >= 1, got m={m}, "
                f"ef_construction={ef_construction}, ef_search={ef_search}"
            )
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
        }

    def search_settings(self) -> dict[str, Any]:
        return {
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "mips": self.mips,
        }

    def _recall_knob(self) -> str:
        return "ef_search (or m / ef_construction when rebuilding)"

    def _metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.mips == "ip" else faiss.METRIC_L2

    def _new_faiss_index(self, dim: int) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dim, self.m, self._metric())
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def _reserve(self, n_new: int) -> None:
        # faiss grows its code vector by doubling as blocks arrive, which would leave up to twice the
        # vectors' memory allocated (and copy it at every doubling). Sizing it once up front is safe:
        # faiss resizes to exactly ntotal * code_size on each add, and shrinking keeps the allocation.
        storage = faiss.downcast_index(self._index.storage)
        codes = getattr(storage, "codes", None)
        if codes is None or not getattr(codes, "is_owned", True):
            return
        held = storage.ntotal * storage.code_size
        codes.resize(held + n_new * storage.code_size)
        codes.resize(held)

    def _search_params(self, n_docs: int):
        return faiss.SearchParametersHNSW(efSearch=max(self.ef_search, n_docs))

    def memory_bytes(self) -> int:
        index = self._index
        if index is None:
            return 0
        hnsw = index.hnsw
        storage = faiss.downcast_index(index.storage)
        total = storage.codes.size()
        if hasattr(storage, "sq"):
            total += storage.sq.trained.size() * 4
        total += hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
        return int(total)

    def _index_bytes(self, n: int, dim: int) -> int:
        d = dim + (1 if self.mips == "l2" else 0)
        return int(n * (self._code_bytes(d) + _hnsw_link_bytes(self.m)) + self._fixed_bytes(d))

    def _memory_params(self, n: int, dim: int) -> dict[str, Any]:
        return {"M": self.m} if self.mips == "ip" else {"M": self.m, "mips": self.mips}

    @staticmethod
    def _code_bytes(d: int) -> int:
        return 4 * d

    @staticmethod
    def _fixed_bytes(d: int) -> int:
        return 8  # the offsets vector's leading entry


class HNSWSQ8Index(HNSWIndex):
    """HNSW over 8-bit scalar-quantised vectors: D + 8M bytes per vector (a quarter of the vectors'
    float32 memory), scores computed on the decoded vectors, so slightly off the true inner products.
    The quantiser's per-dimension ranges are trained on ``train_size`` rows spread over the corpus."""

    kind = "hnsw_sq8"
    plan_rank = 1

    def __init__(
        self,
        m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 192,
        mips: str = "ip",
        max_norm: float | None = None,
        train_size: int = 100_000,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        recall_probes: int = 256,
        verbose: bool = True,
    ):
        super().__init__(
            m=m,
            ef_construction=ef_construction,
            ef_search=ef_search,
            mips=mips,
            max_norm=max_norm,
            chunk_rows=chunk_rows,
            recall_probes=recall_probes,
            verbose=verbose,
        )
        self.train_size = int(train_size)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "train_size": self.train_size}

    def _needs_training(self) -> bool:
        return True

    def _train_size(self, n: int) -> int:
        return min(n, self.train_size)

    def _training_bytes(self, n: int, dim: int) -> int:
        return self._train_size(n) * dim * 4

    def _new_faiss_index(self, dim: int) -> faiss.Index:
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, self.m, self._metric())
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    @staticmethod
    def _code_bytes(d: int) -> int:
        return d

    @staticmethod
    def _fixed_bytes(d: int) -> int:
        return 8 + 2 * 4 * d  # offsets' leading entry + per-dimension (min, range)


class IVFPQIndex(_FaissIndex):
    """Inverted file over ``nlist`` k-means cells with product-quantised residuals: pq_m bytes of code
    + 8 bytes of id per vector (72 for the shipped pq_m=64), the compressed index for 21M-passage
    scale (transformers' "compressed" wiki index is IVF + PQ). Search probes the ``nprobe`` cells whose
    centroids score highest; scores are inner products with the decoded vectors.

    Args:
        nlist: number of cells; None picks sqrt(N), as the RAG authors' own compressed index did
            (ParlAI's RAG agent: IVF4096 + PQ128 over 21M passages, nprobe 64), capped so that each
            centroid gets >= 39 training points. At 100k this keeps the centroids under 10 bytes per
            vector; faiss' wiki suggests 4-16 sqrt(N) when memory for centroids is no concern.
        pq_m: bytes of code per vector (sub-quantisers of 2^pq_nbits centroids); must divide D.
        pq_nbits: bits per sub-quantiser code.
        nprobe: cells searched per query.
        train_size: rows (spread over the corpus) the k-means and PQ are trained on.
    """

    kind = "ivfpq"
    plan_rank = 3
    _MMAP_FLAG: ClassVar[int] = faiss.IO_FLAG_MMAP  # maps the inverted lists

    def __init__(
        self,
        nlist: int | None = None,
        pq_m: int = 64,
        pq_nbits: int = 8,
        nprobe: int = 32,
        train_size: int = 200_000,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        recall_probes: int = 256,
        verbose: bool = True,
    ):
        # The L2 trick would need pq_m to divide D+1; inner-product IVF needs no trick.
        super().__init__(mips="ip", chunk_rows=chunk_rows, recall_probes=recall_probes, verbose=verbose)
        if pq_m < 1 or not 1 <= pq_nbits <= 16 or nprobe < 1 or (nlist is not None and nlist < 1):
            raise RetrievalInputError(
                f"IVF-PQ needs pq_m >= 1, 1 <= pq_nbits <= 16, nprobe >= 1, nlist >= 1 (or None); got "
                f"pq_m={pq_m}, pq_nbits={pq_nbits}, nprobe={nprobe}, nlist={nlist}"
            )
        self.nlist = None if nlist is None else int(nlist)
        self.pq_m = int(pq_m)
        self.pq_nbits = int(pq_nbits)
        self.nprobe = int(nprobe)
        self.train_size = int(train_size)
        self._nlist_used: int | None = None

    def params(self) -> dict[str, Any]:
        p = super().params()
        del p["mips"], p["max_norm"]
        return {
            **p,
            "nlist": self.nlist,
            "pq_m": self.pq_m,
            "pq_nbits": self.pq_nbits,
            "nprobe": self.nprobe,
            "train_size": self.train_size,
        }

    def search_settings(self) -> dict[str, Any]:
        return {
            "nlist": self._nlist_used,
            "pq_m": self.pq_m,
            "pq_nbits": self.pq_nbits,
            "nprobe": self.nprobe,
        }

    def _recall_knob(self) -> str:
        return "nprobe (or pq_m when rebuilding)"

    @staticmethod
    def auto_nlist(n: int, train_size: int | None = None) -> int:
        usable = n if train_size is None else min(n, train_size)
        return int(max(1, min(round(math.sqrt(n)), usable // 39)))

    def _needs_training(self) -> bool:
        return True

    def _train_size(self, n: int) -> int:
        return min(n, max(self.train_size, 39 * (self._nlist_used or 1)))

    def _reset(self, dim: int) -> None:
        if dim % self.pq_m:
            raise RetrievalInputError(
                f"pq_m={self.pq_m} must divide the dimension {dim}: pick a divisor of {dim} such as "
                f"{', '.join(str(x) for x in sorted(_divisors_near(dim, self.pq_m)[:3]))}"
            )

    def _prepare(self, embeds) -> None:
        n, dim = embeds.shape
        self._nlist_used = self.nlist or self.auto_nlist(n, self.train_size)
        if self._nlist_used > n:
            raise RetrievalInputError(
                f"nlist={self._nlist_used} cells for {n} vectors: use at most {n} (or nlist: null for auto)"
            )
        if min(n, self.train_size) < 2**self.pq_nbits:
            raise RetrievalInputError(
                f"IVF-PQ with pq_nbits={self.pq_nbits} trains {2**self.pq_nbits} centroids per "
                f"sub-quantiser and needs at least that many vectors, got {min(n, self.train_size)}: use the "
                "flat index for a corpus this small, or lower pq_nbits"
            )
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(
            quantizer, dim, self._nlist_used, self.pq_m, self.pq_nbits, faiss.METRIC_INNER_PRODUCT
        )
        # The index keeps a pointer to the quantizer: hand ownership over so Python cannot free it.
        index.own_fields = True
        quantizer.this.disown()
        self._index = index
        self._phi = 0.0
        super()._prepare(embeds)

    def _search_params(self, n_docs: int):
        return faiss.SearchParametersIVF(nprobe=min(self.nprobe, self._nlist_used or self.nprobe))

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if not self._index.direct_map.type:
            # A row -> (list, offset) map costs 8 bytes per vector: made only when asked for.
            self._index.make_direct_map()
        return self._index.reconstruct_batch(ids)

    def _after_load(self) -> None:
        self._nlist_used = int(self._index.nlist)

    def _state(self) -> dict[str, Any]:
        return {"nlist": self._nlist_used}

    def memory_bytes(self) -> int:
        index = self._index
        if index is None:
            return 0
        quantizer = faiss.downcast_index(index.quantizer)
        total = quantizer.codes.size() if hasattr(quantizer, "codes") else index.nlist * index.d * 4
        total += index.pq.centroids.size() * 4
        total += index.ntotal * (index.code_size + 8)
        total += index.precomputed_table.size() * 4
        if index.direct_map.type:
            total += index.ntotal * 8
        return int(total)

    def _memory_params(self, n: int, dim: int) -> dict[str, Any]:
        # a pq_m that does not divide dim would be refused by build: the figure assumes the nearest divisor
        pq_m = self.pq_m if dim % self.pq_m == 0 else _divisors_near(dim, self.pq_m)[0]
        nlist = self.nlist or self.auto_nlist(n, self.train_size)
        return {"pq_m": pq_m, "pq_nbits": self.pq_nbits, "nlist": nlist}

    def _memory_notes(self, dim: int) -> list[str]:
        if dim % self.pq_m == 0:
            return []
        new = _divisors_near(dim, self.pq_m)[0]
        return [f"pq_m={self.pq_m} does not divide {dim}: the ivfpq row assumes pq_m={new}"]

    def _index_bytes(self, n: int, dim: int) -> int:
        p = self._memory_params(n, dim)
        code = math.ceil(p["pq_m"] * p["pq_nbits"] / 8)
        return int(n * (code + 8) + p["nlist"] * dim * 4 + (2 ** p["pq_nbits"]) * dim * 4)

    def _training_bytes(self, n: int, dim: int) -> int:
        # k-means and PQ training hold the sample, its assignments and the residuals
        nlist = self._memory_params(n, dim)["nlist"]
        return 2 * min(max(self.train_size, 39 * nlist), n) * dim * 4

    def to_gpu(self, device: int = 0) -> IVFPQIndex:
        """Search on GPU ``device`` (faiss' GPU build only). The CPU index stays the one that is added
        to, saved and measured; ``add`` refreshes the GPU copy."""
        require_faiss_gpu()
        self._require_built()
        self._gpu_device = device
        self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()
        self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, device, self._index)
        return self

    def _faiss_search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        gpu = getattr(self, "_gpu_index", None)
        if gpu is None:
            return super()._faiss_search(queries, n_docs)
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", min(self.nprobe, self._nlist_used))
        return gpu.search(queries, n_docs)

    def _add_all(self, embeds, desc: str) -> None:
        super()._add_all(embeds, desc)
        if getattr(self, "_gpu_index", None) is not None:
            self.to_gpu(self._gpu_device)


# ----------------------------------------------------------------------------------------------------
# IVF-PQ re-scored from the embeddings on disk

#: bytes of candidate vectors a refined search reads into memory at a time (as float64, from the
#: memory-mapped embeddings): the bound on what a search holds beyond the index
REFINE_BUFFER_BYTES = 32 * 2**20


def _refine_rows(dim: int, itemsize: int = 4) -> int:
    """Candidate rows re-scored per block: a float64 copy and the stored row each, within the buffer."""
    return max(1, REFINE_BUFFER_BYTES // (dim * (8 + itemsize)))


def _backing_file(rows) -> tuple[Path | None, str]:
    """The ``.npy`` file ``rows`` reads (a memmap of the whole file), or None and why not."""
    name = getattr(rows, "filename", None) if isinstance(rows, np.memmap) else None
    if not name:
        return None, "held in memory"
    path = Path(name)
    try:
        stored = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None, f"read from {path}, which is no longer a readable .npy file"
    if (
        stored.shape != rows.shape
        or stored.dtype != rows.dtype
        or array_fingerprint(stored) != array_fingerprint(rows)
    ):
        return None, f"a view of part of {path} or a file that changed since the build"
    return path, ""


def _itemsize(embed_dtype: str) -> int:
    return 2 if embed_dtype == "float16" else 4


class IVFPQRefineIndex(IVFPQIndex):
    """IVF-PQ whose top ``k_factor * n_docs`` candidates are re-scored exactly from the stored embeddings.

    The compressed index (pq_m code bytes + 8 id bytes per vector, the cells' centroids and the PQ
    codebooks) is all this kind holds in memory; the exact inner products of its candidates are computed
    from the (N, D) float16 or float32 embeddings it was built from, which it refers to and does not copy:
    the memory-mapped ``.npy`` files of the embedding step stay on disk (page cache), the candidates' rows
    are read in row order, converted to float64, scored against the queries and rounded to float32, and
    the top n_docs come back ordered as exact search orders them (higher score first, equal scores by
    lower row). This is faiss' ``IndexRefineFlat`` (a base index asked for ``k_factor * k`` candidates,
    re-ranked by exact distances) without its in-memory copy of every vector: 21M x 768 needs about 1.5
    GB of RAM instead of 66 GB, plus the embeddings on disk (32 GB in float16).

    Built from a memory-mapped file (``np.load(path, mmap_mode="r")``, as ``rag-index`` does), the index
    saves a reference to it (path relative to the index folder and absolute, shape, dtype, size and a
    fingerprint of its rows); ``DenseIndex.load`` refuses, with `IndexEmbeddingsError`, embeddings that
    are missing or are not those. Built from an array in memory, it re-scores from that array (it keeps
    a reference: changing the array changes the results) and cannot be saved. ``add`` re-scores the new
    rows from what it is given, in the same way.

    Recall against exact search is that of the candidate list: the share of the true top n_docs among
    IVF-PQ's top ``k_factor * n_docs`` in the ``nprobe`` cells searched. Re-scoring costs
    ``k_factor * n_docs`` row reads per query (from disk when the embeddings are not in the page cache).

    Args:
        k_factor: candidates per result re-scored exactly (faiss' ``k_factor``).
        nlist, pq_m, pq_nbits, nprobe, train_size: as `IVFPQIndex`.
    """

    kind = "ivfpq_refine"
    plan_rank = 2  # exact scores and recall near HNSW-SQ8's in IVF-PQ's memory, the embeddings on disk

    def __init__(
        self,
        k_factor: int = 50,
        nlist: int | None = None,
        pq_m: int = 64,
        pq_nbits: int = 8,
        nprobe: int = 64,
        train_size: int = 200_000,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        recall_probes: int = 256,
        verbose: bool = True,
    ):
        super().__init__(
            nlist=nlist,
            pq_m=pq_m,
            pq_nbits=pq_nbits,
            nprobe=nprobe,
            train_size=train_size,
            chunk_rows=chunk_rows,
            recall_probes=recall_probes,
            verbose=verbose,
        )
        if k_factor < 1:
            raise RetrievalInputError(f"k_factor must be >= 1 (candidates per result), got {k_factor}")
        self.k_factor = int(k_factor)
        self._parts: list[tuple[int, Any]] = []  # (first row, (n_i, D) rows) the candidates are read from

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k_factor": self.k_factor}

    def search_settings(self) -> dict[str, Any]:
        return {**super().search_settings(), "k_factor": self.k_factor}

    def _recall_knob(self) -> str:
        return "k_factor or nprobe (or pq_m when rebuilding)"

    # -- the embeddings it re-scores from --------------------------------------------------------------

    def _prepare(self, embeds) -> None:
        self._parts = []
        super()._prepare(embeds)

    def _clear(self) -> None:
        super()._clear()
        self._parts = []

    def _add_all(self, embeds, desc: str) -> None:
        start = self.ntotal
        super()._add_all(embeds, desc)
        self._parts.append((start, embeds))

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of sorted, distinct rows as float64 (len, D), read in row order."""
        out = np.empty((rows.size, self._dim), np.float64)
        for start, part in self._parts:
            lo, hi = np.searchsorted(rows, [start, start + part.shape[0]])
            if lo == hi:
                continue
            local = rows[lo:hi] - start
            if isinstance(part, torch.Tensor):
                out[lo:hi] = part[torch.from_numpy(local).to(part.device)].cpu().double().numpy()
            else:
                out[lo:hi] = part[local]
        return out

    # -- search --------------------------------------------------------------------------------------

    def _search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        n_cand = min(self.ntotal, self.k_factor * n_docs)
        _, cand = self._faiss_search(queries, n_cand)  # (B, C), -1 where fewer were found
        top_scores = np.full((len(queries), n_docs), -np.inf, np.float32)  # (B, K)
        top_ids = np.full((len(queries), n_docs), -1, np.int64)
        rows_per_block = _refine_rows(self._dim)
        for j, (q, row) in enumerate(zip(queries.astype(np.float64), cand.astype(np.int64, copy=False))):
            rows = np.sort(row[row >= 0])  # read in row order
            exact = np.empty(rows.size, np.float64)
            for r0 in range(0, rows.size, rows_per_block):
                # q·d from the float32 / float16 values in float64 (a product of two float32 values is
                # exact in float64), rounded to float32 below: the true inner product to float32 precision
                exact[r0 : r0 + rows_per_block] = self._read_rows(rows[r0 : r0 + rows_per_block]) @ q
            scores = exact.astype(np.float32)
            best = np.lexsort((rows, -scores))[:n_docs]  # exact search's order: score, then lower row
            top_scores[j, : best.size] = scores[best]
            top_ids[j, : best.size] = rows[best]
        self._mark_missing(top_scores, top_ids, n_docs)
        return top_scores, top_ids

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored embeddings themselves (exact), not the decoded codes."""
        rows, position = np.unique(ids, return_inverse=True)
        return self._read_rows(rows).astype(np.float32)[position]

    # -- memory: the compressed index in RAM, the embeddings on disk -----------------------------------

    def _search_bytes(self, n: int, dim: int, embed_dtype: str) -> int:
        # one block of one query's candidate rows: the stored rows and their float64 copy, the rows' ids
        # and scores; faiss' own candidate list (12 bytes per candidate of the query batch) comes on top
        itemsize = _itemsize(embed_dtype)
        rows = min(n, _refine_rows(dim, itemsize))
        return int(rows * (dim * (8 + itemsize) + 8 + 8 + 4 + 8))

    def _disk_bytes(self, n: int, dim: int, embed_dtype: str) -> int:
        return n * dim * _itemsize(embed_dtype)

    # -- save / load: a reference to the embeddings, checked -------------------------------------------

    def _referenced_files(self, directory: Path) -> dict[str, dict[str, Any]]:
        records = []
        for start, part in self._parts:
            path, why = _backing_file(part)
            if path is None:
                raise IndexStateError(
                    f"the {self.kind} index re-scores rows {start}..{start + part.shape[0] - 1} from embeddings "
                    f"{why}, which a saved index cannot refer to: build it from the embeddings' .npy file "
                    "opened memory-mapped (np.load(path, mmap_mode='r'), as rag-index does), then save"
                )
            records.append(embeddings_part_record(path, start, part, directory))
        return {"embeddings": {"rows": self.ntotal, "dim": self._dim, "parts": records}}

    def _attach_referenced_files(
        self, directory: Path, manifest: IndexManifest, override: str | os.PathLike | None
    ) -> None:
        record = manifest.files.get("embeddings") or {}
        parts = record.get("parts") or []
        if not parts or sum(int(p["rows"]) for p in parts) != manifest.n_passages:
            raise IndexCorruptError(
                f"{directory / MANIFEST_NAME} names an {self.kind} index but not the embeddings of all its "
                f"{manifest.n_passages} rows that it re-scores from: rebuild it{rebuild_hint(manifest, directory)}"
            )
        self._parts = [
            (int(p["start"]), _open_recorded_part(p, directory, manifest, override, len(parts)))
            for p in parts
        ]


def _open_recorded_part(
    record: dict[str, Any],
    directory: Path,
    manifest: IndexManifest,
    override: str | os.PathLike | None,
    n_parts: int,
) -> np.ndarray:
    """The memory-mapped embeddings file ``record`` describes, looked for at ``override`` (its folder, or
    the file itself when there is one part), then at the recorded path relative to ``directory``, then
    at the recorded absolute path: the first one whose shape, dtype and fingerprint match."""
    candidates = []
    if override is not None:
        given = Path(override).expanduser()
        candidates.append(given / record["name"] if given.is_dir() or n_parts > 1 else given)
    candidates += [directory / record["path"], Path(record["absolute"])]
    want = f"({record['rows']}, {record['dim']}) {record['dtype']}"
    rows = f"rows {record['start']}..{record['start'] + record['rows'] - 1}"
    seen, mismatch = set(), None
    for path in candidates:
        path = Path(os.path.abspath(path))
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            mismatch = mismatch or (path, f"not a readable .npy file ({type(exc).__name__})")
            continue
        found = f"{tuple(array.shape)} {array.dtype}"
        if tuple(array.shape) != (record["rows"], record["dim"]) or str(array.dtype) != record["dtype"]:
            mismatch = mismatch or (path, f"it holds {found}, the index was built from {want}")
            continue
        if array_fingerprint(array) != record["fingerprint"]:
            mismatch = mismatch or (path, f"same shape {want} but other values (another encoder or corpus)")
            continue
        return array
    fix = f"rebuild the index{rebuild_hint(manifest, directory)}"
    if mismatch is not None:
        path, why = mismatch
        raise IndexEmbeddingsError(
            f"the embeddings at {path} are not the ones the {manifest.index_kind} index in {directory} was built "
            f"from ({rows}): {why}; load it with embeddings=<the folder it was built from>, or {fix}",
            {"embeddings": (record["fingerprint"], str(path))},
        )
    raise IndexEmbeddingsError(
        f"the {manifest.index_kind} index in {directory} re-scores from the embeddings {record['absolute']} "
        f"({rows}), which are missing (moved or deleted): put them back, load it with embeddings=<their new "
        f"folder>, or {fix}",
        {"embeddings": (record["absolute"], None)},
    )
