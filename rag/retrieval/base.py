"""`DenseIndex`, the interface every index kind implements, with what all kinds share: input checks,
build / add / search / reconstruct, the recall check after a build, the memory estimate before one, atomic
save and checked load, and the registry of kinds (filled as the kinds in :mod:`rag.retrieval.kinds` are
defined).

A kind may refer to files it does not hold (``ivfpq_refine`` re-scores from the embeddings files it was
built from): ``save`` records them in the manifest's ``files`` beside the index's own data file, and
``load`` finds and checks them before reading the index (:class:`IndexEmbeddingsError` when they are
missing or are not the ones it was built from)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from rag.atomic import atomic_path, write_text_atomic
from rag.retrieval.arrays import (
    DEFAULT_CHUNK_ROWS,
    check_matrix,
    check_n_docs,
    dtype_name,
    iter_chunks,
    to_float32,
)
from rag.retrieval.errors import (
    IndexCorruptError,
    IndexDeviceError,
    IndexMismatchError,
    IndexStateError,
    RetrievalInputError,
)
from rag.retrieval.exact import SCORE_BUDGET_BYTES, probe_queries, recall_vs_exact
from rag.retrieval.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    METRIC,
    IndexManifest,
    check_data_file,
    check_expected,
    file_record,
    library_versions,
    read_manifest,
    rebuild_hint,
)

__all__ = [
    "INDEX_KINDS",
    "DenseIndex",
    "IndexEmbeddingsError",
    "MemoryEstimate",
    "kind_class",
    "require_faiss_gpu",
]

log = logging.getLogger(__name__)

#: kind name -> class, in the order the kinds are defined; every subclass that sets ``kind`` joins it
INDEX_KINDS: dict[str, type[DenseIndex]] = {}

# Probe queries the recall check after a build scores (DenseIndex's default recall_probes); bigger query
# batches are split at SCORE_BUDGET_BYTES.
_RECALL_PROBES = 256


def kind_class(kind: str) -> type[DenseIndex]:
    """The class of index kind ``kind`` ("flat", "hnsw", "hnsw_sq8", "ivfpq", "ivfpq_refine")."""
    try:
        return INDEX_KINDS[kind]
    except KeyError:
        raise RetrievalInputError(
            f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}"
        ) from None


class IndexEmbeddingsError(IndexMismatchError):
    """The embeddings files a saved index re-scores from are missing, moved, or not the ones it was built
    from (``differences``: ``{"embeddings": (recorded, found)}``)."""


_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _init_names(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up to the parent constructors."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.name != "self" and p.kind not in _VARIADIC}
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return names


@dataclass
class MemoryEstimate:
    """Memory of one index for N vectors of dimension D, before it is built."""

    params: dict[str, Any]  # the parameters the figure turns on, as a table shows them (M, pq_m, nlist)
    index_bytes: int  # held by the built index (also its file size on disk, within a few percent)
    build_bytes: int  # peak while building: the index plus what the build holds beside it
    notes: list[str] = field(default_factory=list)  # parameters the figure had to assume otherwise
    # at most this much more while a search runs (ivfpq_refine's candidate buffer); 0: nothing to speak of
    search_bytes: int = 0
    # files on disk the index reads but does not hold (ivfpq_refine's memory-mapped embeddings: page cache)
    disk_bytes: int = 0


def require_faiss_gpu() -> None:
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not hasattr(faiss, "StandardGpuResources") or n_gpus == 0:
        raise IndexDeviceError(
            "faiss here has no GPU support (the faiss-cpu build, or no visible GPU): keep the index on "
            "the CPU, or on a CUDA machine install the GPU build (pip install -e .[gpu] instead of [cpu])"
        )


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_files(directory: Path, keep: str) -> None:
    """Old data files and temp files left by earlier saves or interrupted ones."""
    for path in directory.iterdir():
        name = path.name
        stale_data = name.startswith("index-") and name != keep
        stale_tmp = name.startswith((".index-", f".{MANIFEST_NAME}.")) and name.endswith(".tmp")
        if (stale_data or stale_tmp) and path.is_file():
            path.unlink(missing_ok=True)


class DenseIndex:
    """Maximum inner product index over N passage embeddings of dimension D (base class).

    Args:
        chunk_rows: rows added (and, for the flat index, searched) per block; bounds the memory a build
            needs beside the index itself.
        recall_probes: probe queries for the recall line logged after building an approximate index
            (0 turns the check off).
        verbose: progress bars and the recall line.
    """

    kind: ClassVar[str] = ""
    is_exact: ClassVar[bool] = False
    #: where a memory refusal recommends this kind among those that fit (lowest first: the most accurate)
    plan_rank: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            # A subclass that only changes behaviour (a test double) keeps its parent's entry.
            INDEX_KINDS.setdefault(cls.kind, cls)

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

    @classmethod
    def create(cls, kind: str, **params) -> DenseIndex:
        """An empty index of ``kind`` ("flat", "hnsw", "hnsw_sq8", "ivfpq", "ivfpq_refine") with its
        constructor params."""
        return kind_class(kind)(**params)

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

    def _index_bytes(self, n: int, dim: int) -> int:
        """Bytes this index will hold for n vectors of dimension dim (within a few percent of
        ``memory_bytes()`` after the build)."""
        raise NotImplementedError

    def _training_bytes(self, n: int, dim: int) -> int:
        """Bytes a build holds for training (the sample and what training derives from it)."""
        return 0

    def _memory_params(self, n: int, dim: int) -> dict[str, Any]:
        """The parameters the memory figure turns on, as a plan's table names them."""
        return {}

    def _memory_notes(self, dim: int) -> list[str]:
        """Parameters the memory figure had to assume otherwise for this dimension."""
        return []

    def _search_bytes(self, n: int, dim: int, embed_dtype: str) -> int:
        """Bytes a search holds beyond the index, bounded whatever the batch (0: nothing to speak of)."""
        return 0

    def _disk_bytes(self, n: int, dim: int, embed_dtype: str) -> int:
        """Bytes of files the index reads at search time without holding them (memory-mapped)."""
        return 0

    def _referenced_files(self, directory: Path) -> dict[str, dict[str, Any]]:
        """Manifest ``files`` entries for files outside ``directory`` the index reads at search time;
        raise here, before anything is written, when they cannot be referred to."""
        return {}

    def _attach_referenced_files(
        self, directory: Path, manifest: IndexManifest, override: str | os.PathLike | None
    ) -> None:
        """Find and check the files ``_referenced_files`` recorded (``override``: where to look first);
        raise :class:`IndexEmbeddingsError` when they are missing or differ."""

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

    # -- memory before building ----------------------------------------------------------------------

    def memory_estimate(self, n: int, dim: int, embed_dtype: str = "float32") -> MemoryEstimate:
        """What this (empty) index will hold for n vectors of dimension dim, and its peak while building:
        the index plus one float32 block of ``chunk_rows`` vectors (two for float16 embeddings, converted
        block by block), the recall check's score block and the training sample of the quantised kinds."""
        if n < 0 or dim < 1:
            raise RetrievalInputError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
        rows = min(self.chunk_rows, n)
        # one float32 block (with the L2 trick's extra column) while adding, and the float16 block it was
        # converted from
        block = rows * (dim + 1) * 4 * (2 if embed_dtype == "float16" else 1)
        recall = 0 if self.is_exact else min(SCORE_BUDGET_BYTES, _RECALL_PROBES * rows * 4)
        held = self._index_bytes(n, dim)
        search = self._search_bytes(n, dim, embed_dtype)
        build = held + block + recall + self._training_bytes(n, dim)
        return MemoryEstimate(
            params=self._memory_params(n, dim),
            index_bytes=int(held),
            build_bytes=int(max(build, held + search)),
            notes=self._memory_notes(dim),
            search_bytes=int(search),
            disk_bytes=int(self._disk_bytes(n, dim, embed_dtype)),
        )

    @classmethod
    def shared_params(cls, other: type[DenseIndex], params: dict[str, Any]) -> dict[str, Any]:
        """The part of ``other``'s constructor arguments ``params`` that applies to this kind: the
        arguments of the class the two kinds share (HNSW's M carries over to HNSW-SQ8, IVF-PQ's pq_m
        to nothing else); keys neither constructor knows are dropped."""
        common = next(klass for klass in cls.__mro__ if issubclass(other, klass))
        names = _init_names(common) & _init_names(cls)
        return {k: v for k, v in params.items() if k in names}

    @classmethod
    def estimate_memory(
        cls,
        n: int,
        dim: int,
        params: dict[str, Any] | None = None,
        *,
        like: type[DenseIndex] | None = None,
        embed_dtype: str = "float32",
    ) -> MemoryEstimate:
        """:meth:`memory_estimate` of an index of this kind built with ``params`` (the constructor
        arguments of ``like``, this kind by default: the ones the two kinds share apply, the others are
        this kind's defaults)."""
        return cls(**cls.shared_params(like or cls, dict(params or {}))).memory_estimate(n, dim, embed_dtype)

    @classmethod
    def estimate_memory_bytes(cls, n: int, dim: int, **params) -> int:
        """Bytes an index of this kind will hold for n vectors of dimension dim, before building it."""
        return cls.estimate_memory(n, dim, params).index_bytes

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
        at a time) or torch. Approximate kinds then log their recall@1/10/100 against exact search on
        ``probe_queries_embeds`` (B, D) when given, else on perturbed corpus rows. Returns self."""
        n, dim = check_matrix(embeds, "embeds")
        if n == 0:
            raise RetrievalInputError("embeds is empty: an index needs at least one passage")
        try:
            self._read_only = False
            self._reset(dim)
            self._dim = dim
            self._embed_dtype = dtype_name(embeds)
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
        n, _ = check_matrix(embeds, "embeds", self._dim)
        if n:
            # Check every new row before the first goes in: a bad row halfway must not leave half an add.
            for start, block in iter_chunks(embeds, self.chunk_rows, "embeds"):
                self._check_new_rows(block, start)
            self._reserve(n)
            self._add_all(embeds, f"adding to {self.kind} index")

    def search(self, query_embeds, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n_docs`` passages by inner product for query_embeds (B, D), numpy or torch (detached,
        moved to the CPU). Returns doc_scores (B, K) float32, true inner products q·d, best first, and
        doc_ids (B, K) int64, rows 0..N-1 of the corpus. An approximate index that finds fewer than K
        passages (tiny ef_search / nprobe) fills the rest with id -1 and score -inf, and warns."""
        self._require_built()
        check_matrix(query_embeds, "query_embeds", self._dim)
        n_docs = check_n_docs(n_docs, self.ntotal)
        q = to_float32(query_embeds, "query_embeds")
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
        """Measure recall@k against exact search over ``embeds``, log one line (info, when ``verbose``),
        keep it in ``build_recall``; warns when recall@10 falls below 0.9."""
        source = "queries"
        if queries is None:
            queries = probe_queries(embeds, self.recall_probes)
            source = "perturbed corpus rows"
        rec = recall_vs_exact(self, embeds, queries, k)
        self.build_recall = rec
        if self.verbose:
            shown = " ".join(f"@{key.split('@')[1]} {val:.3f}" for key, val in rec.items() if "@" in key)
            settings = ", ".join(f"{k}={v}" for k, v in self.search_settings().items())
            log.info(
                "%s (%s) over %s x %s: recall vs exact on %s %s: %s",
                self.kind,
                settings,
                f"{self.ntotal:,}",
                self._dim,
                rec["n_queries"],
                source,
                shown,
            )
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
        require_faiss_gpu()
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
        referenced = self._referenced_files(directory)  # refused here, before the data is written
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        data_path = directory / f"index-{stamp}-{secrets.token_hex(4)}{self._data_suffix()}"
        # 1. the data, under a name no manifest refers to yet (fsynced before the rename)
        with atomic_path(data_path) as tmp:
            self._save_data(tmp)
        m.n_passages = self.ntotal
        m.dim = self._dim
        m.metric = METRIC
        m.embed_dtype = m.embed_dtype or self._embed_dtype
        m.index_kind = self.kind
        m.index_params = self.params()
        m.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        m.versions = library_versions()
        m.state = self._state()
        m.format_version = FORMAT_VERSION
        m.files = {"index": file_record(data_path), **referenced}
        # 2. the manifest naming it, replacing the old one in one rename; 3. the old data files
        try:
            write_text_atomic(directory / MANIFEST_NAME, m.to_json())
            _fsync_directory(directory)
        except BaseException:
            data_path.unlink(missing_ok=True)
            raise
        _remove_stale_files(directory, keep=data_path.name)
        return m

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected: IndexManifest | None = None,
        verify_checksum: bool = True,
        verbose: bool | None = None,
        mmap: bool = False,
        embeddings: str | os.PathLike | None = None,
    ) -> DenseIndex:
        """Load an index saved by `save`. With ``expected``, refuse (`IndexMismatchError`) an index whose
        encoder, dimension, corpus, passage count or metric differ from the fields ``expected`` sets.
        The data file is checked against the manifest's size (and SHA-256 unless verify_checksum=False)
        before faiss reads it, so a truncated or damaged file gives `IndexCorruptError`.

        ``mmap=True`` maps the vectors / codes from the file instead of reading them into memory, so
        that the processes of one machine share them through the page cache (the HNSW graph links are
        still read into each process). Such an index is read-only: ``add`` refuses, ``build`` starts
        afresh in memory.

        ``embeddings``: for a kind that re-scores from the embeddings it was built from (``ivfpq_refine``),
        where to look for them first (their folder or ``.npy`` file), before the place the manifest
        records (relative to ``directory``, then absolute); whatever is found must match the recorded
        shape, dtype and fingerprint, else `IndexEmbeddingsError`. Other kinds ignore it."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        check_expected(directory, manifest, expected)
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
        params = dict(manifest.index_params)
        if verbose is not None:
            params["verbose"] = verbose
        index = kind_cls(**params)
        index._attach_referenced_files(directory, manifest, embeddings)  # before the index file is read
        path = check_data_file(directory, manifest, verify_checksum)
        index._dim = manifest.dim
        index._embed_dtype = manifest.embed_dtype
        index._read_only = bool(mmap)
        try:
            index._load_data(path, manifest)
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            raise IndexCorruptError(
                f"{path} could not be read ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
                f"rebuild it{rebuild_hint(manifest, directory)}"
            ) from exc
        if index.ntotal != manifest.n_passages:
            raise IndexCorruptError(
                f"{path} holds {index.ntotal} vectors but its manifest says {manifest.n_passages}; "
                f"rebuild it{rebuild_hint(manifest, directory)}"
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
            for _, block in iter_chunks(embeds, self.chunk_rows, "embeds"):
                self._add_block(block)
                bar.update(block.shape[0])
