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

Every index: ``build(embeds)``, ``add(embeds)``, ``search(query_embeds, n_docs) -> (doc_scores, doc_ids)``
with true inner products as scores and corpus rows 0..N-1 as ids, ``reconstruct(doc_ids)``, ``ntotal``,
``dim``, ``memory_bytes()``, ``save(directory, manifest)`` and ``DenseIndex.load(directory, expected)``.
Building an approximate index prints its recall against exact search, because approximate search costs
accuracy silently (transformers RAG users lost up to 17 EM points to a badly set index,
huggingface/transformers#8285).

The index lives on the CPU and uses the threads the caller set (``faiss.omp_set_num_threads``,
``torch.set_num_threads``); nothing here changes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import secrets
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from rag.atomic import sha256_file
from rag.retrieval.errors import (
    IndexCorruptError,
    IndexDeviceError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStateError,
    RetrievalInputError,
)

__all__ = [
    "DenseIndex",
    "FlatIndex",
    "HNSWIndex",
    "HNSWSQ8Index",
    "IVFPQIndex",
    "IndexManifest",
    "INDEX_KINDS",
    "make_index",
    "estimate_memory_bytes",
    "exact_search",
    "recall_vs_exact",
    "probe_queries",
]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
METRIC = "inner_product"
DEFAULT_CHUNK_ROWS = 65536
# Above this many score bytes per block the queries are split, so a big query batch never allocates
# a (B, N) score matrix.
SCORE_BUDGET_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class IndexManifest:
    """What a saved index was built from; ``save`` writes it as ``manifest.json`` beside the index file.

    The caller fills the provenance (encoder, corpus); ``save`` fills what the index knows (dimension,
    count, kind, parameters, versions, files). ``load(directory, expected)`` compares the identity
    fields that ``expected`` sets (non-empty) and refuses an index built for another setup.
    """

    encoder_name: str = ""
    encoder_checksum: str = ""  # checksum of the document encoder's weights
    corpus_checksum: str = ""  # checksum of the passages the rows stand for, in row order
    n_passages: int | None = None
    dim: int | None = None
    metric: str = METRIC
    embed_dtype: str = ""  # dtype of the embeddings the index was built from (float32 / float16)
    index_kind: str = ""
    index_params: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    rebuild_command: str = ""  # the command that rebuilds this index; quoted in mismatch errors
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {name, bytes, sha256}
    state: dict[str, Any] = field(default_factory=dict)  # what loading needs beyond the parameters
    format_version: int = FORMAT_VERSION

    # Fields that make an index unusable for a caller when they differ.
    IDENTITY_FIELDS: ClassVar[tuple[str, ...]] = (
        "encoder_name",
        "encoder_checksum",
        "dim",
        "corpus_checksum",
        "n_passages",
        "metric",
    )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("manifest is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys come from a newer writer; keep loading what this version understands.
        return cls(**{k: v for k, v in raw.items() if k in known})

    def differences(self, expected: IndexManifest) -> dict[str, tuple[Any, Any]]:
        """Identity fields where ``expected`` sets a value that differs from this manifest's:
        field -> (saved, expected)."""
        diffs = {}
        for name in self.IDENTITY_FIELDS:
            want = getattr(expected, name)
            if want is None or want == "":
                continue
            have = getattr(self, name)
            if have != want:
                diffs[name] = (have, want)
        return diffs


def _library_versions() -> dict[str, str]:
    import rag

    return {
        "rag": rag.__version__,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------------------
# Input checks and chunking


def _dtype_name(embeds) -> str:
    return str(embeds.dtype).removeprefix("torch.")


def _check_matrix(embeds, what: str, dim: int | None = None) -> tuple[int, int]:
    """Shape and dtype checks shared by build/add/search; returns (rows, dim)."""
    if isinstance(embeds, torch.Tensor):
        floating = embeds.is_floating_point()
    elif isinstance(embeds, np.ndarray):
        floating = np.issubdtype(embeds.dtype, np.floating)
    else:
        raise RetrievalInputError(
            f"{what} must be a numpy array or torch tensor of shape (N, D), got {type(embeds).__name__}"
        )
    if embeds.ndim != 2:
        raise RetrievalInputError(
            f"{what} must have shape (N, D), got shape {tuple(embeds.shape)}"
            + ("; add a batch dimension with x[None]" if embeds.ndim == 1 else "")
        )
    if not floating:
        raise RetrievalInputError(f"{what} must be float32 or float16, got {_dtype_name(embeds)}")
    rows, d = embeds.shape
    if dim is not None and d != dim:
        raise RetrievalInputError(
            f"{what} has dimension {d} but the index holds {dim}-d vectors: the encoder that made them "
            "is not the one the index was built with (check the manifest's encoder_name)"
        )
    return rows, d


def _to_float32(block, what: str, first_row: int = 0) -> np.ndarray:
    """One block of rows as a C-contiguous float32 numpy array, refusing NaN/inf."""
    if isinstance(block, torch.Tensor):
        block = block.detach().to("cpu", torch.float32).numpy()
    out = np.ascontiguousarray(block, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out))[0, 0]) + first_row
        raise RetrievalInputError(
            f"{what} has a NaN or infinite value in row {bad}: the encoder overflowed (float16 "
            "embeddings of an unnormalised encoder?); re-embed in float32"
        )
    return out


def _iter_chunks(embeds, chunk_rows: int, what: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 block) over ``embeds`` (which may be a read-only memmap): one block in memory
    at a time."""
    n = embeds.shape[0]
    for start in range(0, n, chunk_rows):
        yield start, _to_float32(embeds[start : start + chunk_rows], what, start)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, or a copy of it when it is read-only (a memmap)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _check_n_docs(n_docs: int, ntotal: int) -> int:
    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 1:
        raise RetrievalInputError(f"n_docs must be a positive integer, got {n_docs!r}")
    if n_docs > ntotal:
        raise RetrievalInputError(
            f"n_docs={n_docs} but the index holds only {ntotal} passages: ask for at most {ntotal}"
        )
    return int(n_docs)


def _sort_by_score_then_id(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row, highest score first, equal scores by lower id: (B, M) -> (B, k)."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


# ----------------------------------------------------------------------------------------------------
# Exact search over an array (the reference)


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


def _exact_search_blocks(
    blocks: Sequence[tuple[int, torch.Tensor]], queries: torch.Tensor, n_docs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact MIPS of (B, D) float32 queries over (offset, (n_i, D) block) pairs -> (B, K) scores, ids."""
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


def exact_search(
    embeds, query_embeds, n_docs: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n_docs`` inner product search of query_embeds (B, D) over embeds (N, D), which may be
    a memory-mapped float16 array: one (chunk_rows, D) float32 block in memory at a time.

    Returns doc_scores (B, K) float32 and doc_ids (B, K) int64, ties broken towards the lower row.
    """
    n, dim = _check_matrix(embeds, "embeds")
    _check_matrix(query_embeds, "query_embeds", dim)
    n_docs = _check_n_docs(n_docs, n)
    q = _as_tensor(_to_float32(query_embeds, "query_embeds"))
    blocks = ((start, _as_tensor(blk)) for start, blk in _iter_chunks(embeds, chunk_rows, "embeds"))
    # Merge block results as they come so that only one block is held at a time.
    best_s = best_i = None
    for offset, blk in blocks:
        s, i = _exact_search_blocks([(offset, blk)], q, min(n_docs, blk.shape[0]))
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
    rows = np.sort(rng.choice(n, size=min(n_probes, n), replace=False))
    base = _to_float32(embeds[torch.from_numpy(rows) if isinstance(embeds, torch.Tensor) else rows], "embeds")
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
    if isinstance(embeds_or_exact_index, DenseIndex):
        if not embeds_or_exact_index.is_exact:
            raise RetrievalInputError(
                f"the reference must be exact (a FlatIndex or the embeddings), got a "
                f"{embeds_or_exact_index.kind} index"
            )
        _, exact_ids = embeds_or_exact_index.search(queries, kmax)
    else:
        _, exact_ids = exact_search(embeds_or_exact_index, queries, kmax)
    _, approx_ids = index.search(queries, kmax)
    out: dict[str, float] = {}
    for kk in ks:
        hits = [len(np.intersect1d(a[:kk][a[:kk] >= 0], e[:kk])) for a, e in zip(approx_ids, exact_ids)]
        out[f"recall@{kk}"] = float(np.mean(hits)) / kk
    out["n_queries"] = len(approx_ids)
    return out


# ----------------------------------------------------------------------------------------------------
# Atomic file helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Base class


class DenseIndex:
    """Maximum inner product index over N passage embeddings of dimension D (base class).

    Args:
        chunk_rows: rows added (and, for the flat index, searched) per block; bounds the memory a build
            needs beside the index itself.
        recall_probes: probe queries for the recall line printed after building an approximate index
            (0 turns the check off).
        verbose: progress bars and the recall line.
    """

    kind: ClassVar[str] = ""
    is_exact: ClassVar[bool] = False

    def __init__(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, recall_probes: int = 256, verbose: bool = True):
        if chunk_rows < 1:
            raise RetrievalInputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)
        self.recall_probes = int(recall_probes)
        self.verbose = bool(verbose)
        self._dim: int | None = None
        self._embed_dtype = ""
        self._read_only = False  # loaded with mmap=True
        self.build_recall: dict[str, float] | None = None

    # -- what subclasses provide -------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """Constructor arguments that define the index (saved in the manifest, used by load)."""
        return {"chunk_rows": self.chunk_rows, "recall_probes": self.recall_probes, "verbose": self.verbose}

    @property
    def ntotal(self) -> int:
        raise NotImplementedError

    def memory_bytes(self) -> int:
        """Bytes the index holds in memory (vectors, codes, graph links, centroids)."""
        raise NotImplementedError

    @classmethod
    def estimate_memory_bytes(cls, n: int, dim: int, **params) -> int:
        """Bytes an index of this kind will hold for n vectors of dimension dim, before building it."""
        raise NotImplementedError

    def _reset(self, dim: int) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        """Drop everything the index holds."""
        raise NotImplementedError

    def _prepare(self, embeds) -> None:
        """Everything a build needs before the vectors go in (training, norm bound)."""

    def _add_block(self, block: np.ndarray) -> None:
        raise NotImplementedError

    def _check_new_rows(self, block: np.ndarray, first_row: int) -> None:
        """Raise if rows that `add` was given cannot go into this index (beyond the finite check)."""

    def _reserve(self, n_new: int) -> None:
        """Make room for n_new more rows where the backend allows it, before they are added."""

    def _search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _save_data(self, path: Path) -> None:
        raise NotImplementedError

    def _load_data(self, path: Path, manifest: IndexManifest) -> None:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        return {}

    def _data_suffix(self) -> str:
        return ".faiss"

    # -- public API ----------------------------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        return self._dim

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k not in ("verbose",))
        return f"{type(self).__name__}({inner}; ntotal={self.ntotal if self._dim else 0}, dim={self._dim})"

    def build(self, embeds, probe_queries_embeds=None) -> DenseIndex:
        """(Re)build the index from embeds (N, D) float32 or float16, numpy (a memmap is read one chunk
        at a time) or torch. Approximate kinds then print their recall@1/10/100 against exact search on
        ``probe_queries_embeds`` (B, D) when given, else on perturbed corpus rows. Returns self."""
        n, dim = _check_matrix(embeds, "embeds")
        if n == 0:
            raise RetrievalInputError("embeds is empty: an index needs at least one passage")
        try:
            self._read_only = False
            self._reset(dim)
            self._dim = dim
            self._embed_dtype = _dtype_name(embeds)
            self._prepare(embeds)
            self._reserve(n)
            self._add_all(embeds, f"building {self.kind} index")
        except BaseException:
            # A failed or interrupted build must not leave a partial index that searches.
            self._dim = None
            self._clear()
            raise
        if not self.is_exact and (self.recall_probes > 0 or probe_queries_embeds is not None):
            self.report_recall(embeds, probe_queries_embeds)
        return self

    def add(self, embeds) -> None:
        """Append embeds (M, D) as rows ntotal..ntotal+M-1 without touching what the index holds (the
        paper's index hot-swap; a growing knowledge base). On an empty index this is `build`."""
        if self._dim is None:
            self.build(embeds)
            return
        if self._read_only:
            raise IndexStateError(
                f"this {self.kind} index was loaded with mmap=True and is read-only: load it without mmap "
                "to add passages (then save it again)"
            )
        n, _ = _check_matrix(embeds, "embeds", self._dim)
        if n:
            # Check every new row before the first goes in: a bad row halfway must not leave half an add.
            for start, block in _iter_chunks(embeds, self.chunk_rows, "embeds"):
                self._check_new_rows(block, start)
            self._reserve(n)
            self._add_all(embeds, f"adding to {self.kind} index")

    def search(self, query_embeds, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n_docs`` passages by inner product for query_embeds (B, D), numpy or torch (detached,
        moved to the CPU). Returns doc_scores (B, K) float32, true inner products q·d, best first, and
        doc_ids (B, K) int64, rows 0..N-1 of the corpus. An approximate index that finds fewer than K
        passages (tiny ef_search / nprobe) fills the rest with id -1 and score -inf, and warns."""
        self._require_built()
        _check_matrix(query_embeds, "query_embeds", self._dim)
        n_docs = _check_n_docs(n_docs, self.ntotal)
        q = _to_float32(query_embeds, "query_embeds")
        if q.shape[0] == 0:
            return np.zeros((0, n_docs), np.float32), np.zeros((0, n_docs), np.int64)
        return self._search(q, n_docs)

    def reconstruct(self, doc_ids) -> np.ndarray:
        """The stored vectors of doc_ids (any shape, e.g. (B, K)) as float32 (..., D): exact for flat
        and hnsw, the decoded approximation for hnsw_sq8 and ivfpq. Id -1 gives a zero vector."""
        self._require_built()
        ids = np.asarray(doc_ids.cpu() if isinstance(doc_ids, torch.Tensor) else doc_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.max() >= self.ntotal or flat.min() < -1):
            raise RetrievalInputError(f"doc_ids must lie in 0..{self.ntotal - 1} (or -1 for none)")
        out = np.zeros((flat.size, self._dim), np.float32)
        valid = flat >= 0
        if valid.any():
            out[valid] = self._reconstruct(flat[valid])
        return out.reshape(*ids.shape, self._dim)  # (..., D)

    def report_recall(self, embeds, queries=None, k: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
        """Measure recall@k against exact search over ``embeds``, print one line, keep it in
        ``build_recall``; warns when recall@10 falls below 0.9."""
        source = "queries"
        if queries is None:
            queries = probe_queries(embeds, self.recall_probes)
            source = "perturbed corpus rows"
        rec = recall_vs_exact(self, embeds, queries, k)
        self.build_recall = rec
        shown = " ".join(f"@{key.split('@')[1]} {val:.3f}" for key, val in rec.items() if "@" in key)
        settings = ", ".join(f"{k}={v}" for k, v in self.search_settings().items())
        line = (
            f"[rag.index] {self.kind} ({settings}) over {self.ntotal:,} x {self._dim}: recall vs exact "
            f"on {rec['n_queries']} {source}: {shown}"
        )
        if self.verbose:
            print(line, file=sys.stderr, flush=True)
        r10 = rec.get("recall@10", min(v for key, v in rec.items() if "@" in key))
        if r10 < 0.9:
            warnings.warn(
                f"{self.kind} index recall@10 is {r10:.3f} against exact search: retrieval will miss "
                f"passages; raise {self._recall_knob()} or use the flat index",
                stacklevel=2,
            )
        return rec

    def search_settings(self) -> dict[str, Any]:
        """The parameters that trade speed for recall, for reports."""
        return {}

    def _recall_knob(self) -> str:
        return "the search parameters"

    def to_gpu(self, device: int = 0) -> DenseIndex:
        """Move the index to GPU ``device`` (only where faiss was built with GPU support)."""
        _require_faiss_gpu()
        raise IndexDeviceError(
            f"faiss has no GPU version of the {self.kind} index: use the flat or ivfpq index on a GPU"
        )

    # -- save / load ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, manifest: IndexManifest | None = None) -> IndexManifest:
        """Write the index and its manifest into ``directory`` atomically and return the manifest.

        The data goes to a new uniquely named file (temp name, fsync, rename), then ``manifest.json``,
        which names that file, replaces the old manifest in one os.replace; only then are the old data
        files removed. A crash at any point leaves either the previous index or the new one loadable,
        never a mix. ``manifest`` brings the provenance (encoder, corpus); the rest is filled here."""
        self._require_built()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        m = dataclasses.replace(manifest) if manifest is not None else IndexManifest()
        for name, have in (("n_passages", self.ntotal), ("dim", self._dim)):
            given = getattr(m, name)
            if given is not None and given != have:
                raise RetrievalInputError(
                    f"manifest says {name}={given} but the index holds {name}={have}: the manifest "
                    "describes another corpus or encoder"
                )
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        token = f"{stamp}-{secrets.token_hex(4)}"
        data_name = f"index-{token}{self._data_suffix()}"
        tmp_data = directory / f".{data_name}.tmp"
        try:
            self._save_data(tmp_data)
            _fsync_path(tmp_data)
            os.replace(tmp_data, directory / data_name)
        finally:
            tmp_data.unlink(missing_ok=True)
        data_path = directory / data_name
        m.n_passages = self.ntotal
        m.dim = self._dim
        m.metric = METRIC
        m.embed_dtype = m.embed_dtype or self._embed_dtype
        m.index_kind = self.kind
        m.index_params = self.params()
        m.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        m.versions = _library_versions()
        m.state = self._state()
        m.format_version = FORMAT_VERSION
        m.files = {
            "index": {
                "name": data_name,
                "bytes": data_path.stat().st_size,
                "sha256": sha256_file(data_path),
            }
        }
        tmp_manifest = directory / f".{MANIFEST_NAME}.{token}.tmp"
        try:
            tmp_manifest.write_text(m.to_json())
            _fsync_path(tmp_manifest)
            os.replace(tmp_manifest, directory / MANIFEST_NAME)
            _fsync_path(directory)
        except BaseException:
            tmp_manifest.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            raise
        _remove_stale_files(directory, keep=data_name)
        return m

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected: IndexManifest | None = None,
        verify_checksum: bool = True,
        verbose: bool | None = None,
        mmap: bool = False,
    ) -> DenseIndex:
        """Load an index saved by `save`. With ``expected``, refuse (`IndexMismatchError`) an index whose
        encoder, dimension, corpus, passage count or metric differ from the fields ``expected`` sets.
        The data file is checked against the manifest's size (and SHA-256 unless verify_checksum=False)
        before faiss reads it, so a truncated or damaged file gives `IndexCorruptError`.

        ``mmap=True`` maps the vectors / codes from the file instead of reading them into memory, so
        that the processes of one machine share them through the page cache (the HNSW graph links are
        still read into each process). Such an index is read-only: ``add`` refuses, ``build`` starts
        afresh in memory."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if expected is not None:
            diffs = manifest.differences(expected)
            if diffs:
                raise IndexMismatchError(_mismatch_message(directory, manifest, expected, diffs), diffs)
        kind_cls = INDEX_KINDS.get(manifest.index_kind)
        if kind_cls is None:
            raise IndexCorruptError(
                f"{directory / MANIFEST_NAME} names index kind {manifest.index_kind!r}, which this "
                f"version does not know (known: {', '.join(INDEX_KINDS)})"
            )
        if cls is not DenseIndex and not issubclass(kind_cls, cls):
            raise RetrievalInputError(
                f"{directory} holds a {manifest.index_kind} index, not a {cls.kind or cls.__name__}: "
                "load it with DenseIndex.load"
            )
        info = manifest.files.get("index") or {}
        path = directory / str(info.get("name", ""))
        if not info.get("name") or not path.is_file():
            raise IndexCorruptError(
                f"{directory} has a manifest but its index file {info.get('name')!r} is missing: the "
                f"directory was copied in part; rebuild it{_rebuild_hint(manifest, directory)}"
            )
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise IndexCorruptError(
                f"{path} is {size:,} bytes but the manifest says {info.get('bytes'):,}: the file is "
                f"truncated or was overwritten; rebuild it{_rebuild_hint(manifest, directory)}"
            )
        if verify_checksum and sha256_file(path) != info.get("sha256"):
            raise IndexCorruptError(
                f"{path} does not match the SHA-256 in its manifest: the file is damaged; rebuild "
                f"it{_rebuild_hint(manifest, directory)}"
            )
        params = dict(manifest.index_params)
        if verbose is not None:
            params["verbose"] = verbose
        index = kind_cls(**params)
        index._dim = manifest.dim
        index._embed_dtype = manifest.embed_dtype
        index._read_only = bool(mmap)
        try:
            index._load_data(path, manifest)
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            raise IndexCorruptError(
                f"{path} could not be read ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
                f"rebuild it{_rebuild_hint(manifest, directory)}"
            ) from exc
        if index.ntotal != manifest.n_passages:
            raise IndexCorruptError(
                f"{path} holds {index.ntotal} vectors but its manifest says {manifest.n_passages}; "
                f"rebuild it{_rebuild_hint(manifest, directory)}"
            )
        return index

    # -- helpers -------------------------------------------------------------------------------------

    def _require_built(self) -> None:
        if self._dim is None or self.ntotal == 0:
            raise IndexStateError(
                f"the {self.kind} index is empty: call build(embeds) or DenseIndex.load(directory) first"
            )

    def _add_all(self, embeds, desc: str) -> None:
        n = embeds.shape[0]
        with tqdm(
            total=n, desc=desc, unit="vec", disable=not self.verbose or n <= self.chunk_rows, leave=False
        ) as bar:
            for start, block in _iter_chunks(embeds, self.chunk_rows, "embeds"):
                self._add_block(block)
                bar.update(block.shape[0])
                del start


def read_manifest(directory: str | os.PathLike) -> IndexManifest:
    """The manifest of a saved index, with clear errors when there is none or it is unreadable."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise IndexNotFoundError(
            f"no saved index in {directory} (no {MANIFEST_NAME}): build one with `rag-index`, or point to "
            "the directory that `rag-index` wrote"
        )
    try:
        manifest = IndexManifest.from_json(path.read_text())
    except (ValueError, TypeError) as exc:
        raise IndexCorruptError(f"{path} is not a valid index manifest ({exc}); rebuild the index") from exc
    if manifest.format_version > FORMAT_VERSION:
        raise IndexCorruptError(
            f"{path} was written by a newer rag (format {manifest.format_version} > {FORMAT_VERSION}): "
            "upgrade rag or rebuild the index"
        )
    return manifest


def _rebuild_hint(manifest: IndexManifest, directory: Path, expected: IndexManifest | None = None) -> str:
    command = (expected.rebuild_command if expected is not None else "") or manifest.rebuild_command
    if not command:
        command = f"rag-index index={manifest.index_kind or 'hnsw'} index_dir={directory} rebuild=true"
    return f" with: {command}"


def _mismatch_message(
    directory: Path, saved: IndexManifest, expected: IndexManifest, diffs: dict[str, tuple[Any, Any]]
) -> str:
    lines = [f"the index in {directory} was built for another setup than the one in use:"]
    for name, (have, want) in diffs.items():
        lines.append(f"  {name}: index has {have!r}, expected {want!r}")
    lines.append(
        "Rebuild the index with the encoder and corpus you use now"
        + _rebuild_hint(saved, directory, expected)
        + " (or load with the encoder/corpus it was built from)"
    )
    return "\n".join(lines)


def _remove_stale_files(directory: Path, keep: str) -> None:
    """Old data files and temp files left by earlier saves or interrupted ones."""
    for path in directory.iterdir():
        name = path.name
        stale_data = name.startswith("index-") and name != keep
        stale_tmp = name.startswith((".index-", f".{MANIFEST_NAME}.")) and name.endswith(".tmp")
        if (stale_data or stale_tmp) and path.is_file():
            path.unlink(missing_ok=True)


def _require_faiss_gpu() -> None:
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not hasattr(faiss, "StandardGpuResources") or n_gpus == 0:
        raise IndexDeviceError(
            "faiss here has no GPU support (the faiss-cpu build, or no visible GPU): keep the index on "
            "the CPU, or on a CUDA machine install the GPU build (pip install -e .[gpu] instead of [cpu])"
        )


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

    def __init__(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, recall_probes: int = 0, verbose: bool = True):
        super().__init__(chunk_rows=chunk_rows, recall_probes=recall_probes, verbose=verbose)
        self._blocks: list[torch.Tensor] = []
        self._device: torch.device = torch.device("cpu")

    @property
    def ntotal(self) -> int:
        return sum(b.shape[0] for b in self._blocks)

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._blocks)

    @classmethod
    def estimate_memory_bytes(cls, n: int, dim: int, **params) -> int:
        return 4 * n * dim

    def _reset(self, dim: int) -> None:
        self._blocks = []

    def _clear(self) -> None:
        self._blocks = []

    def _add_block(self, block: np.ndarray) -> None:
        rows = _as_tensor(block).to(self._device)
        # Top up the last block first so that every block but the last is full: reconstruct() finds a
        # row by division, and search does few large matmuls rather than many small ones.
        if self._blocks and self._blocks[-1].shape[0] < self.chunk_rows:
            room = self.chunk_rows - self._blocks[-1].shape[0]
            self._blocks[-1] = torch.cat([self._blocks[-1], rows[:room]])
            rows = rows[room:]
        for start in range(0, rows.shape[0], self.chunk_rows):
            self._blocks.append(rows[start : start + self.chunk_rows].clone())

    def _search(self, queries: np.ndarray, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_tensor(queries).to(self._device)
        offsets = np.cumsum([0] + [b.shape[0] for b in self._blocks[:-1]]).tolist()
        if self._device.type != "cpu":
            blocks = list(zip(offsets, self._blocks))
            return _exact_search_blocks_device(blocks, q, n_docs)
        return _exact_search_blocks(list(zip(offsets, self._blocks)), q, n_docs)

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
                self._blocks.append(torch.from_numpy(_to_float32(block, "stored embeddings", start).copy()))

    def to_gpu(self, device: int = 0) -> FlatIndex:
        """Move the stored vectors to CUDA device ``device`` (torch, so faiss' GPU build is not needed)."""
        if not torch.cuda.is_available():
            raise IndexDeviceError("no CUDA device is visible to torch: keep the flat index on the CPU")
        self._device = torch.device("cuda", device)
        self._blocks = [b.to(self._device) for b in self._blocks]
        return self


def _exact_search_blocks_device(blocks, queries: torch.Tensor, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
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
            for _, block in _iter_chunks(embeds, self.chunk_rows, "embeds"):
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
        missing = ids < 0
        if missing.any():
            scores[missing] = -np.inf
            warnings.warn(
                f"the {self.kind} index found fewer than n_docs={n_docs} passages for "
                f"{int(missing.any(1).sum())} of {len(ids)} queries (ids -1): raise {self._recall_knob()}",
                stacklevel=3,
            )
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

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
        rows = np.arange(n)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    if isinstance(embeds, torch.Tensor):
        return _to_float32(embeds[torch.from_numpy(rows)], "embeds")
    return _to_float32(embeds[rows], "embeds")


def _divisors_near(n: int, target: int, count: int = 3) -> list[int]:
    return sorted(sorted((x for x in range(1, n + 1) if n % x == 0), key=lambda x: abs(x - target))[:count])


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

    @classmethod
    def estimate_memory_bytes(cls, n: int, dim: int, m: int = 32, mips: str = "ip", **params) -> int:
        d = dim + (1 if mips == "l2" else 0)
        return int(n * (cls._code_bytes(d) + _hnsw_link_bytes(m)) + cls._fixed_bytes(d))

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
                f"{', '.join(str(x) for x in _divisors_near(dim, self.pq_m))}"
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

    @classmethod
    def estimate_memory_bytes(
        cls,
        n: int,
        dim: int,
        nlist: int | None = None,
        pq_m: int = 64,
        pq_nbits: int = 8,
        train_size: int = 200_000,
        **params,
    ) -> int:
        nlist = nlist or cls.auto_nlist(n, train_size)
        code = math.ceil(pq_m * pq_nbits / 8)
        return int(n * (code + 8) + nlist * dim * 4 + (2**pq_nbits) * dim * 4)

    def to_gpu(self, device: int = 0) -> IVFPQIndex:
        """Search on GPU ``device`` (faiss' GPU build only). The CPU index stays the one that is added
        to, saved and measured; ``add`` refreshes the GPU copy."""
        _require_faiss_gpu()
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
# Registry


INDEX_KINDS: dict[str, type[DenseIndex]] = {
    cls.kind: cls for cls in (FlatIndex, HNSWIndex, HNSWSQ8Index, IVFPQIndex)
}


def _kind_class(kind: str) -> type[DenseIndex]:
    try:
        return INDEX_KINDS[kind]
    except KeyError:
        raise RetrievalInputError(
            f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}"
        ) from None


def make_index(kind: str, **params) -> DenseIndex:
    """An empty index of ``kind`` ("flat", "hnsw", "hnsw_sq8", "ivfpq") with its constructor params."""
    return _kind_class(kind)(**params)


def estimate_memory_bytes(kind: str, n: int, dim: int, **params) -> int:
    """Bytes an index of ``kind`` will hold for n vectors of dimension dim, before building it (within a
    few percent of ``memory_bytes()`` after the build). Building needs at most one ``chunk_rows`` block
    (and the doubling of faiss' graph vector) beyond it."""
    if n < 0 or dim < 1:
        raise RetrievalInputError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    return _kind_class(kind).estimate_memory_bytes(n, dim, **params)
