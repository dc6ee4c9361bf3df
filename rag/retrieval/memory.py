"""Index memory planning: what each index kind will hold for N vectors of dimension D, before building it.

At paper scale the choice of index is a memory decision. For DPR's 21,015,324 passages of 768-d vectors:

- ``flat`` holds the float32 vectors, 4D bytes each: 64.6 GB;
- ``hnsw`` adds M graph links per level to them, 4D + ~8M bytes each (M=32: 70.3 GB; DPR's M=512: 151 GB);
- ``hnsw_sq8`` keeps 8-bit codes instead, D + ~8M bytes each (M=32: 21.9 GB);
- ``ivfpq`` keeps ``pq_m`` code bytes and an 8-byte id each (pq_m=64: 1.5 GB);
- ``ivfpq_refine`` holds the same in RAM (1.5 GB) and a bounded candidate buffer while searching (34 MB),
  and re-scores from the embeddings on disk (32.3 GB in float16), memory-mapped: page cache, not counted.

:func:`plan_index_memory` makes that table for the N, D and index parameters at hand, next to the memory this
machine has available (:func:`log_plan` logs it), and :meth:`MemoryPlan.check` refuses a build that cannot
fit, naming the kinds that do. The figures come from each kind itself (:meth:`DenseIndex.memory_estimate
<rag.retrieval.base.DenseIndex.memory_estimate>`, within a few percent of faiss' real allocation, checked in
tests/test_index.py), which adds what a build holds beside the index: one float32 block of ``chunk_rows``
vectors (two for float16 embeddings, which are converted block by block), the training sample of the
quantised kinds, and the recall check's score block.

Loading for search (training, evaluation) needs the index bytes once per process, unless the index is read
memory-mapped (``DenseIndex.load(..., mmap=True)``): then the vectors / codes live in the page cache, shared
by every process of the node, and only the HNSW graph links are private to each process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from rag.retrieval.base import INDEX_KINDS, kind_class
from rag.retrieval.errors import RetrievalError

__all__ = [
    "IndexMemoryError",
    "KindEstimate",
    "MemoryPlan",
    "available_memory_bytes",
    "log_plan",
    "plan_for_index",
    "plan_index_memory",
]

log = logging.getLogger(__name__)

#: a build may use this share of the available memory; the rest is for the process itself and the OS
DEFAULT_HEADROOM = 0.9
#: set to 0 to build even when the plan says the index will not fit (the estimate may be pessimistic)
SKIP_ENV = "RAG_INDEX_MEMORY_CHECK"


class IndexMemoryError(RetrievalError, MemoryError):
    """The index asked for needs more memory than this machine has; the message names kinds that fit."""


def _fmt(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


# ------------------------------------------------------------------------------------------- the machine


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get: the smaller of the kernel's MemAvailable and what the process's
    cgroup limit leaves (containers and SLURM jobs limit memory below what the machine has). None when
    neither can be read (not Linux)."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (
        (cgroup / "memory.max", cgroup / "memory.current"),  # cgroup v2
        (cgroup / "memory" / "memory.limit_in_bytes", cgroup / "memory" / "memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        # v1 reports "no limit" as a huge number near 2**63
        if limit is not None and usage is not None and limit < 2**60:
            candidates.append(max(limit - usage, 0))
            break
    return min(candidates) if candidates else None


# ------------------------------------------------------------------------------------------- estimates


@dataclass
class KindEstimate:
    """Memory of one index kind for the plan's N and D."""

    kind: str
    params: dict  # the parameters the figure assumes (M, pq_m, nlist)
    index_bytes: int  # held by the built index (also its file size on disk, within a few percent)
    build_bytes: int  # peak while building: the index plus what the build holds beside it
    fits: bool | None = None  # None when the available memory is unknown
    search_bytes: int = 0  # at most this much more while a search runs (ivfpq_refine's candidate buffer)
    disk_bytes: int = 0  # files it reads memory-mapped without holding them (ivfpq_refine's embeddings)

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind} ({shown})" if shown else self.kind


@dataclass
class MemoryPlan:
    """The memory every index kind needs for N vectors of dimension D, and the kind asked for."""

    n: int
    dim: int
    kind: str  # the kind about to be built
    estimates: list[KindEstimate]
    available_bytes: int | None
    headroom: float = DEFAULT_HEADROOM
    embed_bytes_per_value: int = 4
    notes: list[str] = field(default_factory=list)

    def estimate(self, kind: str) -> KindEstimate:
        return next(e for e in self.estimates if e.kind == kind)

    @property
    def budget_bytes(self) -> int | None:
        return None if self.available_bytes is None else int(self.available_bytes * self.headroom)

    def fitting_kinds(self) -> list[KindEstimate]:
        """Kinds that fit, most accurate first (hnsw, hnsw_sq8, ivfpq_refine, ivfpq, then flat: exact but
        slow at scale)."""
        return sorted((e for e in self.estimates if e.fits), key=lambda e: INDEX_KINDS[e.kind].plan_rank)

    def table(self) -> str:
        """A printable table: per kind the index size, the build peak and whether it fits."""
        embeds = self.n * self.dim * self.embed_bytes_per_value
        head = (
            f"index memory plan for {self.n:,} vectors x {self.dim} "
            f"(embeddings on disk: {_fmt(embeds)}); available: "
            + (
                f"{_fmt(self.available_bytes)} (a build may use {self.headroom:.0%})"
                if self.available_bytes is not None
                else "unknown"
            )
        )
        width = max([40] + [len(e.describe()) for e in self.estimates])
        rows = [head, f"  {'kind':<{width}} {'index':>10} {'build peak':>11}  fits"]
        for e in self.estimates:
            mark = "yes" if e.fits else ("?" if e.fits is None else "NO")
            star = " <- asked for" if e.kind == self.kind else ""
            rows.append(
                f"  {e.describe():<{width}} {_fmt(e.index_bytes):>10} {_fmt(e.build_bytes):>11}  {mark}{star}"
            )
        for e in self.estimates:
            if e.disk_bytes:
                dtype = "float16" if self.embed_bytes_per_value == 2 else "float32"
                rows.append(
                    f"  {e.kind}: index = RAM, + {_fmt(e.search_bytes)} while searching; re-scores from the "
                    f"{_fmt(e.disk_bytes)} of {dtype} embeddings on disk (memory-mapped: page cache, not counted)"
                )
        rows += [f"  {note}" for note in self.notes]
        return "\n".join(rows)

    def check(self) -> None:
        """Raise :class:`IndexMemoryError` when the kind asked for does not fit, naming the kinds that do."""
        if os.environ.get(SKIP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
            return
        asked = self.estimate(self.kind)
        if asked.fits is not False:
            return
        fitting = [e for e in self.fitting_kinds() if e.kind != self.kind]
        if fitting:
            advice = "use " + " or ".join(
                f"index={e.kind} ({_fmt(e.build_bytes)} to build, {_fmt(e.index_bytes)} held)"
                for e in fitting
            )
        else:
            advice = "no index kind fits here"
        raise IndexMemoryError(
            f"the {asked.describe()} index over {self.n:,} vectors x {self.dim} needs about "
            f"{_fmt(asked.build_bytes)} to build ({_fmt(asked.index_bytes)} held afterwards), but this machine "
            f"has {_fmt(self.available_bytes)} available ({_fmt(self.budget_bytes)} usable at "
            f"{self.headroom:.0%}): {advice}, or build on a machine with more memory. "
            f"Set {SKIP_ENV}=0 to try anyway."
        )


def plan_index_memory(
    n: int,
    dim: int,
    kind: str = "hnsw",
    params: dict | None = None,
    available_bytes: int | None = -1,
    headroom: float = DEFAULT_HEADROOM,
    embed_dtype: str = "float32",
) -> MemoryPlan:
    """The memory each index kind needs for ``n`` vectors of dimension ``dim``.

    ``kind`` and ``params`` describe the index about to be built (its constructor arguments, e.g.
    ``{"m": 32}``); every other kind's row takes the arguments it shares with that kind (the HNSW rows
    share M, every row ``chunk_rows``) and its own defaults for the rest; an IVF-PQ pq_m that does not
    divide ``dim`` is moved to a divisor. ``available_bytes`` defaults (-1) to :func:`available_memory_bytes`;
    None means unknown (nothing is refused).
    """
    asked = kind_class(kind)
    params = dict(params or {})
    if available_bytes == -1:
        available_bytes = available_memory_bytes()
    estimates, notes = [], []
    for name, cls in INDEX_KINDS.items():
        e = cls.estimate_memory(n, dim, params, like=asked, embed_dtype=embed_dtype)
        if cls is asked:
            notes = e.notes
        fits = None if available_bytes is None else e.build_bytes <= available_bytes * headroom
        estimates.append(
            KindEstimate(name, e.params, e.index_bytes, e.build_bytes, fits, e.search_bytes, e.disk_bytes)
        )
    return MemoryPlan(
        n=n,
        dim=dim,
        kind=kind,
        estimates=estimates,
        available_bytes=available_bytes,
        headroom=headroom,
        embed_bytes_per_value=2 if embed_dtype == "float16" else 4,
        notes=notes,
    )


def plan_for_index(index, n: int, dim: int, embed_dtype: str = "float32", **kwargs) -> MemoryPlan:
    """:func:`plan_index_memory` for an (empty) :class:`~rag.retrieval.index.DenseIndex` about to be built."""
    return plan_index_memory(n, dim, index.kind, index.params(), embed_dtype=embed_dtype, **kwargs)


def log_plan(plan: MemoryPlan, prefix: str = "") -> None:
    """Log the plan's table, a line per record (info level)."""
    for line in plan.table().splitlines():
        log.info("%s%s", prefix, line)
