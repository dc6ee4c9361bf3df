"""Corpus embedding: d(z) for every passage, into memory-mapped ``.npy`` files that survive interruption.

Layout of an embeddings directory::

    embeds_<start>_<end>.npy    rows start..end-1 of the corpus, (end - start, D), float32 or float16
    embeds_<start>_<end>.json   count, dim, dtype, SHA-256 of the rows, the encoder and the passages used

A file is *finished* when its JSON exists: the ``.npy`` is written to a temporary file in the same directory
and renamed into place (``os.replace``, :func:`rag.atomic.atomic_path`) before the JSON is, so an
interrupted run never leaves a file that looks finished. A rerun skips finished files and computes the rest.

The corpus is cut into ``num_shards`` contiguous shards (shard i holds rows ``i*N//n .. (i+1)*N//n - 1``),
and each shard into files of at most ``rows_per_file`` rows (the unit of resumption). Machine or GPU ``i``
of ``n`` runs with ``shard=i, num_shards=n``; copying all the files into one directory gives the whole
corpus, which :func:`open_embeddings` opens as one (N, D) array.

Prebuilt embeddings: ``embed_corpus(..., prebuilt=[dir, ...])`` takes a file's rows from a directory of the
same layout (the mini-wiki's, shipped in the package: :func:`rag.data.miniwiki.embeddings_dir`) instead of
computing them, when that directory holds exactly these rows made by the same encoder (settings and weights
fingerprint) from the same passages (their SHA-256), and its file passes its own checksum. The rows are cast
to the dtype asked for and the record says where they came from (``seeded_from``). Anything else, another
encoder, corpus or a damaged file, is embedded as usual.

Speed: passages are tokenized once per file, sorted by token count and batched, so a batch pads only to
its own longest passage (``scripts/bench_embed.py`` measures the gain over fixed padding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rag.atomic import atomic_path, write_json_atomic
from rag.retrieval.encoders import BertEncoder
from rag.retrieval.errors import RetrievalError, RetrievalInputError
from rag.types import Passage

FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
_FILE_RE = re.compile(r"^embeds_(\d+)_(\d+)\.json$")

log = logging.getLogger(__name__)


class EmbeddingsError(RetrievalError):
    """An embeddings directory that is incomplete, damaged, or made by another encoder or corpus."""


def corpus_checksum(passages: Sequence[Passage]) -> str:
    """SHA-256 over the ids, titles and texts of the passages, in order: identifies a corpus in manifests."""
    digest = hashlib.sha256()
    for p in passages:
        digest.update(f"{p.id}\t{p.title}\t{p.text}\n".encode())
    return digest.hexdigest()


def shard_range(n_rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of shard ``shard`` of ``num_shards`` contiguous, near-equal shards."""
    if num_shards < 1:
        raise RetrievalInputError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise RetrievalInputError(
            f"shard must be in 0..{num_shards - 1} for num_shards={num_shards}, got {shard}"
        )
    return shard * n_rows // num_shards, (shard + 1) * n_rows // num_shards


def _file_stem(start: int, end: int) -> str:
    return f"embeds_{start:010d}_{end:010d}"


def array_checksum(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes: the ``sha256`` an embeddings file's JSON records for its rows."""
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1)).hexdigest()


@dataclass
class EmbedReport:
    """What one :func:`embed_corpus` call did."""

    out_dir: Path
    computed: list[tuple[int, int]]  # row ranges embedded by this call
    skipped: list[tuple[int, int]]  # row ranges found finished and left alone
    rows: tuple[int, int]  # the rows of this call's shard
    seeded: list[tuple[int, int]] = field(default_factory=list)  # row ranges taken from prebuilt embeddings


def _encoder_record(encoder: BertEncoder) -> dict:
    return {**encoder.settings(), "weights_checksum": encoder.weights_checksum(), "dim": encoder.dim}


def _check_finished(meta: dict, path: Path, expected: dict) -> None:
    """Raise if a finished file was made with another encoder, dtype or corpus than this run's."""
    for key in ("encoder", "passages_sha256", "dtype"):
        if meta.get(key) != expected[key]:
            saved, wanted = meta.get(key), expected[key]
            if key == "encoder":
                diff = {k: (saved.get(k), wanted.get(k)) for k in wanted if saved.get(k) != wanted.get(k)}
                what = f"encoder settings differ {diff}"
            elif key == "dtype":
                what = f"dtype {saved} was stored, {wanted} is asked for"
            else:
                what = "the passages of these rows differ (another corpus, or the corpus changed)"
            raise EmbeddingsError(
                f"{path} was made by another run than this one: {what}. Embed into a fresh directory, or "
                f"pass overwrite=True (rag-index: embed.overwrite=true) to recompute it"
            )


def embed_corpus(
    encoder: BertEncoder,
    passages: Sequence[Passage],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    dtype: str = "float32",
    rows_per_file: int = 65536,
    shard: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    show_progress: bool = True,
    prebuilt: Sequence[str | os.PathLike] = (),
) -> EmbedReport:
    """Embed shard ``shard`` of ``num_shards`` of ``passages`` as (title, text) pairs into ``out_dir``.

    Files already finished by an earlier (interrupted) call with the same encoder and passages are kept;
    ``overwrite`` recomputes them. A file whose rows a ``prebuilt`` directory holds for the same encoder and
    passages is copied from there (module docstring). Returns which row ranges were computed, seeded and
    skipped.
    """
    if dtype not in DTYPES:
        raise RetrievalInputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1 or rows_per_file < 1:
        raise RetrievalInputError(
            f"batch_size and rows_per_file must be >= 1, got {batch_size} and {rows_per_file}"
        )
    if len(passages) == 0:
        raise RetrievalInputError("the corpus has no passages: nothing to embed")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    start, end = shard_range(len(passages), shard, num_shards)
    ranges = [(s, min(s + rows_per_file, end)) for s in range(start, end, rows_per_file)]

    if overwrite:
        remove_embeddings(out, start, end)
    todo, skipped = plan_embedding(encoder, passages, out, ranges, dtype)

    progress = tqdm(
        total=end - start,
        initial=sum(hi - lo for lo, hi in skipped),
        desc=f"embed shard {shard}/{num_shards}",
        unit="passage",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    computed, seeded = [], []
    with progress:
        for lo, hi, expected in todo:
            if any(_seed_file(Path(d).expanduser(), out, lo, hi, dtype, expected) for d in prebuilt):
                seeded.append((lo, hi))
                progress.update(hi - lo)
                continue
            _embed_file(encoder, passages[lo:hi], out, lo, hi, batch_size, dtype, expected, progress)
            computed.append((lo, hi))
    return EmbedReport(out_dir=out, computed=computed, skipped=skipped, rows=(start, end), seeded=seeded)


def _seed_file(source: Path, out: Path, lo: int, hi: int, dtype: str, expected: dict) -> bool:
    """Write the file of rows ``lo..hi-1`` of ``out`` from the prebuilt directory ``source`` if it holds
    exactly these rows for ``expected``'s encoder and passages; False (nothing written) otherwise."""
    if not source.is_dir() or source.resolve() == out.resolve():
        return False
    for meta in read_embeddings_meta(source):
        same = (meta["start"], meta["end"]) == (lo, hi) and all(
            meta.get(key) == expected[key] for key in ("encoder", "passages_sha256")
        )
        if not same:
            continue
        rows = np.load(meta["_path"], mmap_mode="r")
        if rows.shape != (hi - lo, meta["dim"]) or array_checksum(np.asarray(rows)) != meta["sha256"]:
            log.warning(f"the prebuilt embeddings {meta['_path']} fail their checksum: embedding instead")
            return False
        array = np.ascontiguousarray(rows, dtype=np.dtype(dtype))
        npy_path = clear_embeddings_file(out, lo, hi)
        with atomic_path(npy_path) as tmp_path, open(tmp_path, "wb") as f:
            np.save(f, array)
        seeded = {**expected, "seeded_from": {"path": meta["_path"], "dtype": meta["dtype"]}}
        record_embeddings_file(out, lo, hi, int(meta["dim"]), array_checksum(array), seeded)
        return True
    return False


def remove_embeddings(out: Path, start: int, end: int) -> None:
    """Remove the finished files of ``out`` that hold any of rows ``start..end-1`` (an overwrite)."""
    _remove_records(out, [m for m in read_embeddings_meta(out) if m["start"] < end and start < m["end"]])


def plan_embedding(
    encoder: BertEncoder,
    passages: Sequence[Passage],
    out: Path,
    ranges: Sequence[tuple[int, int]],
    dtype: str,
) -> tuple[list[tuple[int, int, dict]], list[tuple[int, int]]]:
    """Which files of ``ranges`` (row spans) to embed into ``out``, with the JSON record each must carry
    (encoder, dtype, passages checksum), and which are finished already (by a file of exactly these rows,
    or a consolidated one holding them). A finished file made by another encoder, dtype or corpus raises
    :class:`EmbeddingsError`."""
    encoder_record = _encoder_record(encoder)
    records = read_embeddings_meta(out)
    todo, skipped, cover_checksums = [], [], {}
    for lo, hi in ranges:
        expected = {
            "encoder": encoder_record,
            "dtype": dtype,
            "passages_sha256": corpus_checksum(passages[lo:hi]),
        }
        cover = next((m for m in records if m["start"] <= lo and hi <= m["end"]), None)
        if cover is not None:
            span = (cover["start"], cover["end"])
            if span not in cover_checksums:
                cover_checksums[span] = (
                    expected["passages_sha256"]
                    if span == (lo, hi)
                    else corpus_checksum(passages[span[0] : span[1]])
                )
            expected_cover = {**expected, "passages_sha256": cover_checksums[span]}
            _check_finished(cover, Path(cover["_path"]).with_suffix(".json"), expected_cover)
            if Path(cover["_path"]).is_file():
                skipped.append((lo, hi))
                continue
        todo.append((lo, hi, expected))
    return todo, skipped


def clear_embeddings_file(out: Path, lo: int, hi: int) -> Path:
    """Make the file of rows ``lo..hi-1`` unfinished before it is (re)written: its JSON record goes first (so
    that it stops looking finished before it changes), then any temporary file a killed run left (these
    rows belong to the caller alone). Returns the ``.npy`` path to write (through a temporary sibling)."""
    stem = _file_stem(lo, hi)
    npy_path = out / f"{stem}.npy"
    (out / f"{stem}.json").unlink(missing_ok=True)
    # rag.atomic's temporaries, and the {stem}.npy.tmp-<pid> names of earlier versions
    for stale in [*out.glob(f".{npy_path.name}.*.tmp"), *out.glob(f"{stem}.*.tmp-*")]:
        stale.unlink(missing_ok=True)
    return npy_path


def record_embeddings_file(out: Path, lo: int, hi: int, dim: int, checksum: str, expected: dict) -> None:
    """Write the JSON record that marks the file of rows ``lo..hi-1`` finished (after its ``.npy`` is in
    place): format, rows, dim, the rows' SHA-256 and ``expected`` (encoder, dtype, passages checksum)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "start": lo,
        "end": hi,
        "count": hi - lo,
        "dim": dim,
        "sha256": checksum,
        **expected,
    }
    write_json_atomic(out / f"{_file_stem(lo, hi)}.json", meta)


def _embed_file(
    encoder: BertEncoder,
    passages: Sequence[Passage],
    out: Path,
    lo: int,
    hi: int,
    batch_size: int,
    dtype: str,
    expected: dict,
    progress: tqdm,
) -> None:
    npy_path = clear_embeddings_file(out, lo, hi)
    tokenizer = encoder.tokenizer
    # tokenize once without padding, then sort by token count: each batch pads to its own longest row
    tokens = tokenizer(
        [p.title for p in passages],
        [p.text for p in passages],
        truncation="longest_first",
        max_length=encoder.max_length,
    )
    lengths = np.array([len(ids) for ids in tokens["input_ids"]])
    order = np.argsort(-lengths, kind="stable")  # longest first: an out-of-memory error shows at once
    device = encoder.device
    # the .npy is fsynced and renamed into place before its JSON is written (the module docstring)
    with atomic_path(npy_path) as tmp_path:
        rows = np.lib.format.open_memmap(
            tmp_path, mode="w+", dtype=np.dtype(dtype), shape=(hi - lo, encoder.dim)
        )
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                features = [{k: tokens[k][i] for k in tokens} for i in idx]
                batch = tokenizer.pad(features, padding=True, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                embeds = encoder(**batch)  # (b, D)
                rows[idx] = embeds.float().cpu().numpy().astype(dtype, copy=False)
                progress.update(len(idx))
        rows.flush()
        checksum = array_checksum(np.asarray(rows))
        del rows
    record_embeddings_file(out, lo, hi, encoder.dim, checksum, expected)


# ---------------------------------------------------------------------------------------------- reading


class ShardedEmbeddings:
    """Several embeddings files seen as one read-only (N, D) array without copying them.

    Supports ``len``, ``shape``, ``dtype``, integer / slice / integer-array row indexing (returning
    ``np.ndarray``) and ``np.asarray`` (which does copy, into one array).
    """

    def __init__(self, parts: list[np.ndarray], starts: list[int]):
        self.parts = parts
        self.starts = np.asarray(starts, dtype=np.int64)
        self.n_rows = int(self.starts[-1] + len(parts[-1]))
        self.dim = int(parts[0].shape[1])
        self.dtype = parts[0].dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.dim)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.asarray([key])][0]
        if isinstance(key, slice):
            return self[np.arange(self.n_rows)[key]]
        ids = np.asarray(key, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -self.n_rows or flat.max() >= self.n_rows):
            raise IndexError(f"row index out of range for {self.n_rows} embeddings")
        flat = np.where(flat < 0, flat + self.n_rows, flat)
        part_of = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((flat.size, self.dim), dtype=self.dtype)
        for p in np.unique(part_of):
            sel = part_of == p
            out[sel] = self.parts[p][flat[sel] - self.starts[p]]
        return out.reshape(*ids.shape, self.dim)

    def __array__(self, dtype=None, copy=None):
        array = np.concatenate([np.asarray(p) for p in self.parts])
        return array if dtype is None else array.astype(dtype, copy=False)


def read_embeddings_meta(directory: str | os.PathLike, include_covered: bool = False) -> list[dict]:
    """The JSON records of the finished files of an embeddings directory, by start row.

    A file whose rows a larger finished file also holds (the parts of a consolidated file that an
    interrupted :func:`consolidate_embeddings` left) is left out.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise EmbeddingsError(f"no embeddings directory at {directory}: embed the corpus first (rag-index)")
    metas = []
    for path in sorted(directory.iterdir()):
        if _FILE_RE.match(path.name):
            meta = json.loads(path.read_text())
            meta["_path"] = str(path.with_suffix(".npy"))
            metas.append(meta)
    if include_covered:
        return sorted(metas, key=lambda m: m["start"])
    spans = [(m["start"], m["end"]) for m in metas]
    metas = [
        m
        for m in metas
        if not any(a <= m["start"] and m["end"] <= b and (a, b) != (m["start"], m["end"]) for a, b in spans)
    ]
    return sorted(metas, key=lambda m: m["start"])


def _remove_records(directory: Path, metas: list[dict]) -> None:
    for meta in metas:  # the record first, so that a half-removed file never looks finished
        Path(meta["_path"]).with_suffix(".json").unlink(missing_ok=True)
        Path(meta["_path"]).unlink(missing_ok=True)


def consolidate_embeddings(
    directory: str | os.PathLike, passages: Sequence[Passage], show_progress: bool = True
) -> np.ndarray:
    """Merge the files of a finished embeddings directory into one file; return it as a (N, D) memmap.

    Indexes read one (N, D) array a block at a time; a single memory-mapped file gives them that without
    holding a copy in memory. The merged file is written beside the parts (temp file, rename, record) and
    only then are the parts removed, so an interruption at any point leaves a loadable directory. Needs
    the disk space of the embeddings once more while it runs.
    """
    directory = Path(directory).expanduser()
    embeds = open_embeddings(directory, expected_rows=len(passages))
    if not isinstance(embeds, ShardedEmbeddings):
        # already one file; clear parts that an interrupted consolidation left beside it
        n = len(passages)
        _remove_records(
            directory, [m for m in read_embeddings_meta(directory, True) if m["end"] - m["start"] < n]
        )
        return embeds
    metas = read_embeddings_meta(directory)
    for meta in metas:
        if meta["passages_sha256"] != corpus_checksum(passages[meta["start"] : meta["end"]]):
            raise EmbeddingsError(
                f"{meta['_path']} was made from other passages than rows {meta['start']}..{meta['end'] - 1} of "
                "this corpus: embed the corpus into a fresh directory"
            )
    n, dim = embeds.shape
    stem = _file_stem(0, n)
    with atomic_path(directory / f"{stem}.npy") as tmp_path:
        merged = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=embeds.dtype, shape=(n, dim))
        for part, start in tqdm(
            list(zip(embeds.parts, embeds.starts.tolist())),
            desc="consolidate embeddings",
            disable=not show_progress,
            leave=False,
        ):
            merged[start : start + len(part)] = part
        merged.flush()
        checksum = array_checksum(np.asarray(merged))
        del merged
    record = {k: v for k, v in metas[0].items() if not k.startswith("_")}
    record.update(start=0, end=n, count=n, sha256=checksum, passages_sha256=corpus_checksum(passages))
    write_json_atomic(directory / f"{stem}.json", record)
    _remove_records(directory, metas)
    return open_embeddings(directory, expected_rows=n)


def open_embeddings(
    directory: str | os.PathLike,
    expected_rows: int | None = None,
    verify: bool = False,
) -> np.ndarray | ShardedEmbeddings:
    """Open all finished files of ``directory`` as one read-only (N, D) array.

    One file comes back as a ``np.memmap`` (no copy); several as a :class:`ShardedEmbeddings` view over
    their memmaps. Raises :class:`EmbeddingsError` naming the missing rows when the files do not tile
    ``0..N-1`` (for example a shard of a multi-machine run not yet copied in), or when ``expected_rows`` is
    given and differs. ``verify`` also checks every file's SHA-256 (reads everything once).
    """
    directory = Path(directory).expanduser()
    metas = read_embeddings_meta(directory)
    if not metas:
        raise EmbeddingsError(
            f"{directory} holds no finished embeddings files: run the embedding (rag-index) first"
        )
    parts, starts, position = [], [], 0
    for meta in metas:
        if meta["start"] != position:
            what = (
                "overlap" if meta["start"] < position else f"rows {position}..{meta['start'] - 1} are missing"
            )
            raise EmbeddingsError(
                f"the embeddings files in {directory} do not tile the corpus: {what} (at "
                f"{Path(meta['_path']).name}). Finish or copy in the missing shards (rag-index embed.shard=i "
                "embed.num_shards=n), or remove files left from a run with other shard settings"
            )
        path = Path(meta["_path"])
        if not path.is_file():
            raise EmbeddingsError(f"{path} is missing though its JSON record exists: rerun the embedding")
        array = np.load(path, mmap_mode="r")
        if array.shape != (meta["count"], meta["dim"]) or str(array.dtype) != meta["dtype"]:
            raise EmbeddingsError(
                f"{path} holds {array.shape} {array.dtype}, its record says ({meta['count']}, {meta['dim']}) "
                f"{meta['dtype']}: the file is damaged; delete it and its .json and rerun the embedding"
            )
        if verify and array_checksum(np.asarray(array)) != meta["sha256"]:
            raise EmbeddingsError(
                f"{path} fails its SHA-256 check: the file is damaged; delete it and its .json and rerun"
            )
        parts.append(array)
        starts.append(meta["start"])
        position = meta["end"]
    dims = {m["dim"] for m in metas}
    encoders = {m["encoder"]["weights_checksum"] for m in metas}
    if len(dims) > 1 or len(encoders) > 1:
        raise EmbeddingsError(
            f"the files in {directory} come from {len(encoders)} encoders / dims {sorted(dims)}: "
            "keep one encoder's embeddings per directory"
        )
    if expected_rows is not None and position != expected_rows:
        raise EmbeddingsError(
            f"{directory} holds embeddings of {position} passages, the corpus has {expected_rows}: "
            f"rows {position}..{expected_rows - 1} are missing (finish the other shards) or the corpus changed"
        )
    if len(parts) == 1:
        return parts[0]
    return ShardedEmbeddings(parts, starts)


def embeddings_encoder_record(directory: str | os.PathLike) -> dict:
    """The encoder record (name, settings, weights checksum, dim) stored with the embeddings."""
    metas = read_embeddings_meta(directory)
    if not metas:
        raise EmbeddingsError(f"{directory} holds no finished embeddings files")
    return metas[0]["encoder"]
