"""Passages in memory-mapped Arrow files: 21M passages looked up by row or id without loading them into RAM.

DPR's ``psgs_w100.tsv`` (21,015,324 passages, 13 GB) read into Python objects takes tens of GB; the same
passages in Arrow files on disk are memory-mapped, so a process holds only the pages it touches and every
process of a node shares them through the page cache. :func:`convert_passages` converts any corpus file that
:mod:`rag.data.corpus` reads, once; :class:`ArrowPassages` opens the result as a read-only
``Sequence[Passage]`` that the retrievers, the embedding and the index build take in place of a list.

Layout of a converted directory::

    part-00000.arrow ...   rows in order, ``rows_per_part`` per file, Arrow IPC stream files with the
                           columns id, title, text (the files ``datasets.Dataset.from_file`` memory-maps)
    part-00000.json ...    a finished part: its rows, the SHA-256 of its passages, the source it came from
    ids.arrow              (id, row) sorted by id, for lookup by id; absent when the ids are consecutive
                           integers (DPR's 1..21015324), where the row is ``int(id) - first``
    passages.json          written last: the count, the parts, the corpus checksum, the source

Conversion is resumable and atomic: each part is written to a temporary file, fsynced and renamed into place
before its record; an interrupted run resumes after the last finished part, and a directory without
``passages.json`` is refused until the conversion has finished. Several processes that ask for the same
conversion (every rank of a DDP job) wait on a lock while the first converts.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag.atomic import atomic_path, replace_atomic, sha256_file, temporary_sibling, write_json_atomic
from rag.data.corpus import iter_passages
from rag.data.errors import DataError
from rag.types import Passage

__all__ = [
    "ArrowCorpusError",
    "ArrowPassages",
    "convert_passages",
    "load_passages",
    "is_arrow_corpus",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "passages.json"
IDS_NAME = "ids.arrow"
SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
# Arrow record batches of this many rows: small enough that one batch of Python strings stays small,
# large enough that per-batch overhead vanishes.
BATCH_ROWS = 8192


class ArrowCorpusError(DataError, ValueError):
    """An Arrow passage directory that is unfinished, damaged, or converted from another source."""


log = logging.getLogger(__name__)


def _passage_line(pid: str, title: str, text: str) -> bytes:
    # the line rag.retrieval.embed.corpus_checksum hashes, so that both checksums agree
    return f"{pid}\t{title}\t{text}\n".encode()


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _part_name(i: int) -> str:
    return f"part-{i:05d}"


def _source_record(source: Path, format: str, strict: bool, split_words, split_overlap) -> dict:
    stat = source.stat()
    return {
        "path": str(source.resolve()),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "format": format,
        "strict": strict,
        "split_words": split_words,
        "split_overlap": split_overlap,
    }


def is_arrow_corpus(path: str | os.PathLike) -> bool:
    """True for a directory that :func:`convert_passages` finished."""
    return (Path(path).expanduser() / MANIFEST_NAME).is_file()


# ---------------------------------------------------------------------------------------------- conversion


class _PartWriter:
    """Writes one part file (temporary name until :meth:`finish`) and hashes its passages on the way."""

    def __init__(self, out: Path, index: int, start: int):
        self.out, self.index, self.start = out, index, start
        self.path = out / f"{_part_name(index)}.arrow"
        self.tmp = temporary_sibling(self.path)
        self.sink = pa.OSFile(str(self.tmp), "wb")
        self.writer = pa.ipc.new_stream(self.sink, SCHEMA)
        self.rows = 0
        self.digest = hashlib.sha256()
        self.first_int: int | None = None
        self.sequential = True

    def write(self, ids: list[str], titles: list[str], texts: list[str]) -> None:
        for pid, title, text in zip(ids, titles, texts):
            self.digest.update(_passage_line(pid, title, text))
        if self.sequential:
            self._track_ids(ids)
        batch = pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.string()), pa.array(titles, pa.string()), pa.array(texts, pa.string())],
            schema=SCHEMA,
        )
        self.writer.write_batch(batch)
        self.rows += len(ids)

    def _track_ids(self, ids: list[str]) -> None:
        # ids that are the integers first, first+1, ... in row order need no lookup table: row = id - first
        if self.first_int is None and ids:
            if not (ids[0].isdigit() and str(int(ids[0])) == ids[0]):
                self.sequential = False
                return
            self.first_int = int(ids[0]) - self.start - self.rows
        first = self.first_int + self.start + self.rows
        self.sequential = all(pid == str(value) for pid, value in zip(ids, range(first, first + len(ids))))

    def finish(self, source: dict) -> dict:
        self.writer.close()
        self.sink.close()
        replace_atomic(self.tmp, self.path)
        record = {
            "format_version": FORMAT_VERSION,
            "part": self.index,
            "start": self.start,
            "end": self.start + self.rows,
            "rows": self.rows,
            "bytes": self.path.stat().st_size,
            "sha256": self.digest.hexdigest(),
            "first_int_id": self.first_int if self.sequential else None,
            "source": source,
        }
        write_json_atomic(self.out / f"{_part_name(self.index)}.json", record)
        return record

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            self.sink.close()
        self.tmp.unlink(missing_ok=True)


def _finished_parts(out: Path, source: dict) -> list[dict]:
    """The records of parts 0, 1, ... that are finished, in order; refuses parts of another source."""
    records = []
    for i in itertools.count():
        meta_path = out / f"{_part_name(i)}.json"
        if not meta_path.is_file():
            break
        record = json.loads(meta_path.read_text())
        if record.get("source") != source:
            raise ArrowCorpusError(
                f"{out} holds a conversion of another source or with other settings ({record.get('source')}), "
                f"not of {source['path']} ({source['format']}, split_words={source['split_words']}): convert "
                "into another directory, or pass overwrite=True to start again"
            )
        part_path = out / f"{_part_name(i)}.arrow"
        if not part_path.is_file() or part_path.stat().st_size != record["bytes"]:
            break  # a record without its file: convert this part again
        records.append(record)
    return records


def _remove_conversion(out: Path) -> None:
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # first: the directory stops looking finished
    for path in out.iterdir():
        if path.name.startswith(("part-", ".part-", "ids.", ".ids.")):
            path.unlink(missing_ok=True)


def convert_passages(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "auto",
    strict: bool = True,
    split_words: int | None = None,
    split_overlap: int = 0,
    rows_per_part: int = 1_000_000,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ArrowPassages:
    """Convert a passage file (any format of :func:`rag.data.corpus.iter_passages`) into Arrow files in
    ``out_dir`` and open them.

    Rows keep the file's order (row i of the result is the i-th passage ``iter_passages`` yields, with the
    same validation: duplicate ids, empty texts and malformed rows raise unless ``strict=False``). A
    finished directory for the same source is opened as it is; an interrupted one resumes after its last
    finished part. Peak memory: one part's Arrow buffers are streamed out batch by batch, so it stays near
    one batch plus the set of ids seen (for the duplicate check, ~100 bytes per passage).
    """
    source = Path(source).expanduser()
    out = Path(out_dir).expanduser()
    if rows_per_part < 1:
        raise ArrowCorpusError(f"rows_per_part must be >= 1, got {rows_per_part}")
    if not source.is_file():
        from rag.data.errors import DataFileNotFoundError

        raise DataFileNotFoundError(source, "passage file", "check the path, or download the file first")
    if format == "auto":
        from rag.data.corpus import detect_passage_format

        format = detect_passage_format(source)
    record = _source_record(source, format, strict, split_words, split_overlap)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out / ".lock"):
        if overwrite:
            _remove_conversion(out)
        elif is_arrow_corpus(out):
            manifest = _read_manifest(out)
            if manifest["source"] != record and not _same_content(manifest, record, source):
                raise ArrowCorpusError(
                    f"{out} holds a finished conversion of {manifest['source']['path']} "
                    f"({manifest['source']['bytes']:,} bytes, format {manifest['source']['format']}), which "
                    f"differs from {source} as it is now: pass overwrite=True to convert again, or use another "
                    "directory"
                )
            return ArrowPassages(out)
        _convert(source, out, record, rows_per_part, show_progress)
    return ArrowPassages(out)


def _same_content(manifest: dict, record: dict, source: Path) -> bool:
    """A source that differs from the manifest's only by its modification time (copied, touched, written
    again with the same rows) is the same source if its bytes hash the same."""
    saved = {k: v for k, v in manifest["source"].items() if k != "mtime_ns"}
    now = {k: v for k, v in record.items() if k != "mtime_ns"}
    return saved == now and manifest.get("source_sha256") == sha256_file(source)


def _convert(source: Path, out: Path, record: dict, rows_per_part: int, show_progress: bool) -> None:
    parts = _finished_parts(out, record)
    for stale in out.glob(".part-*.tmp"):
        stale.unlink(missing_ok=True)
    # parts after the first unfinished one were left by a run with another part size: redo them
    for path in out.glob("part-*"):
        if int(path.name[5:10]) >= len(parts):
            path.unlink(missing_ok=True)
    done = parts[-1]["end"] if parts else 0
    if done:
        log.info(f"resuming the conversion of {source} after {done:,} passages ({len(parts)} finished parts)")
    else:
        log.info(f"converting {source} ({record['bytes'] / 1e9:.2f} GB, {record['format']}) into {out}")
    started = time.perf_counter()
    passages = iter_passages(
        source,
        record["format"],
        record["strict"],
        split_words=record["split_words"],
        split_overlap=record["split_overlap"],
    )
    # earlier passages are read again (the duplicate-id check needs them) but not written
    rows = itertools.islice(passages, done, None)
    writer: _PartWriter | None = None
    position = done
    try:
        while True:
            chunk = list(itertools.islice(rows, BATCH_ROWS))
            if not chunk:
                break
            ids = [p.id for p in chunk]
            titles = [p.title for p in chunk]
            texts = [p.text for p in chunk]
            while ids:
                if writer is None:
                    writer = _PartWriter(out, len(parts), position)
                room = rows_per_part - writer.rows
                writer.write(ids[:room], titles[:room], texts[:room])
                position += min(room, len(ids))
                ids, titles, texts = ids[room:], titles[room:], texts[room:]
                if writer.rows == rows_per_part:
                    parts.append(writer.finish(record))
                    writer = None
                    _progress(show_progress, parts[-1], position, done, started)
        if writer is not None and writer.rows:
            parts.append(writer.finish(record))
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if not parts:
        raise ArrowCorpusError(f"{source} holds no passages: nothing to convert")
    _finish(out, parts, record)
    seconds = time.perf_counter() - started
    log.info(f"converted {parts[-1]['end']:,} passages in {seconds:.0f} s into {out}")


def _progress(show: bool, part: dict, position: int, done: int, started: float) -> None:
    if show:
        rate = (position - done) / max(time.perf_counter() - started, 1e-9)
        log.info(f"part {part['part']} finished: {position:,} passages so far ({rate:,.0f} passages/s)")


def _finish(out: Path, parts: list[dict], record: dict) -> None:
    """Write the id lookup (unless ids are consecutive integers), the corpus checksum and the manifest."""
    n = parts[-1]["end"]
    tables = [_open_part(out / f"{_part_name(p['part'])}.arrow") for p in parts]
    table = pa.concat_tables(tables)
    digest = hashlib.sha256()
    for batch in table.to_batches(max_chunksize=BATCH_ROWS):
        cols = batch.to_pydict()
        for pid, title, text in zip(cols["id"], cols["title"], cols["text"]):
            digest.update(_passage_line(pid, title, text))
    first = parts[0]["first_int_id"]
    sequential = first is not None and all(
        p["first_int_id"] is not None and p["first_int_id"] == first for p in parts
    )
    if not sequential:
        ids = table.column("id")
        order = pc.sort_indices(ids)
        lookup = pa.table({"id": pc.take(ids, order), "row": order.cast(pa.int64())})
        with (
            atomic_path(out / IDS_NAME) as tmp,  # closed (inner contexts first), fsynced, then renamed
            pa.OSFile(str(tmp), "wb") as sink,
            pa.ipc.new_stream(sink, lookup.schema) as writer,
        ):
            writer.write_table(lookup.combine_chunks(), max_chunksize=1 << 20)
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_passages": n,
        "parts": [f"{_part_name(p['part'])}.arrow" for p in parts],
        "part_rows": [p["rows"] for p in parts],
        "corpus_sha256": digest.hexdigest(),
        "id_lookup": "sequential" if sequential else IDS_NAME,
        "first_int_id": first if sequential else None,
        "source": record,
        "source_sha256": sha256_file(Path(record["path"])),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)


# ---------------------------------------------------------------------------------------------- reading


def _open_part(path: Path) -> pa.Table:
    """A part file as a table whose buffers point into a read-only memory map (no copy)."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        unfinished = any(directory.glob("part-*.json"))
        raise ArrowCorpusError(
            f"{directory} is not a finished Arrow corpus (no {MANIFEST_NAME})"
            + (
                ": its conversion was interrupted; run rag-convert-passages (or convert_passages) again to "
                "resume it"
                if unfinished
                else ": convert a passage file into it first (rag.data.arrow.convert_passages)"
            )
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArrowCorpusError(f"{path} was written by a newer rag: upgrade rag or convert again")
    return manifest


class ArrowPassages(Sequence[Passage]):
    """The passages of a converted directory as a read-only, memory-mapped ``Sequence[Passage]``.

    ``passages[i]`` builds one :class:`Passage` from the mapped row; ``passages[a:b]`` is a view (no copy)
    with rows renumbered from 0; ``passages[[i, j, ...]]`` (or an integer array) gives a list. Iteration
    reads the rows batch by batch. ``row_of(id)`` / ``get_by_id(id)`` find a passage by its id (by
    arithmetic for consecutive integer ids, else by binary search over the sorted id file). Pickles as its
    directory and row range, so DataLoader workers and spawned processes reopen the mapping instead of
    copying it.
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        self.directory = Path(directory).expanduser()
        self.manifest = _read_manifest(self.directory)
        parts = []
        for name, rows in zip(self.manifest["parts"], self.manifest["part_rows"]):
            path = self.directory / name
            if not path.is_file():
                raise ArrowCorpusError(f"{path} is missing: convert the corpus again (overwrite=True)")
            table = _open_part(path)
            if table.num_rows != rows or table.schema != SCHEMA:
                raise ArrowCorpusError(
                    f"{path} holds {table.num_rows} rows of schema {table.schema.names}, its manifest says "
                    f"{rows} of {SCHEMA.names}: the file is damaged; convert again (overwrite=True)"
                )
            parts.append(table)
        self._full = pa.concat_tables(parts)
        self._lookup: pa.Table | None = None
        self._set_range(0, self._full.num_rows)
        if verify:
            self.verify()

    def _set_range(self, start: int, stop: int) -> None:
        self._range = (start, stop)
        self._table = self._full.slice(start, stop - start)
        self._columns = [self._table.column(name) for name in ("id", "title", "text")]

    def _view(self, start: int, stop: int) -> ArrowPassages:
        """Rows start..stop-1 of the whole corpus, sharing this object's mapping."""
        view = object.__new__(ArrowPassages)
        view.directory, view.manifest, view._full, view._lookup = (
            self.directory,
            self.manifest,
            self._full,
            self._lookup,
        )
        view._set_range(start, stop)
        return view

    # ------------------------------------------------------------------------------------ Sequence

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            n = len(self)
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"passage row {int(key)} out of range for {n} passages")
            ids, titles, texts = self._columns
            return Passage(id=ids[i].as_py(), title=titles[i].as_py(), text=texts[i].as_py())
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                offset = self._range[0]
                return self._view(offset + start, offset + max(start, stop))
            return self.take(range(start, stop, step))
        return self.take(key)

    def take(self, rows) -> list[Passage]:
        """The passages of ``rows`` (any iterable of row numbers, e.g. the (B*K,) flattened doc_ids)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"passage rows out of range for {n} passages")
        rows = np.where(rows < 0, rows + n, rows)
        # row by row: Arrow's take over a chunked string column concatenates the chunks first, which reads the
        # whole column (1.5 s for 160 rows of 1M passages, against 1 ms this way)
        ids, titles, texts = self._columns
        return [
            Passage(id=ids[r].as_py(), title=titles[r].as_py(), text=texts[r].as_py()) for r in rows.tolist()
        ]

    def __iter__(self) -> Iterator[Passage]:
        for batch in self._table.to_batches(max_chunksize=BATCH_ROWS):
            cols = batch.to_pydict()
            for pid, title, text in zip(cols["id"], cols["title"], cols["text"]):
                yield Passage(id=pid, title=title, text=text)

    def __repr__(self) -> str:
        start, stop = self._range
        view = "" if (start, stop) == (0, self.manifest["n_passages"]) else f", rows {start}..{stop - 1}"
        return f"ArrowPassages({str(self.directory)!r}, {len(self):,} passages{view})"

    def __getstate__(self) -> dict:
        return {"directory": str(self.directory), "range": self._range}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])
        self._set_range(*state["range"])

    # ------------------------------------------------------------------------------------ by id

    def row_of(self, passage_id: str) -> int:
        """The row (in this view) of the passage with id ``passage_id``; KeyError when there is none."""
        start, stop = self._range
        if self.manifest["id_lookup"] == "sequential":
            text = str(passage_id)
            row = int(text) - self.manifest["first_int_id"] if text.isdigit() else -1
            found = 0 <= row < self.manifest["n_passages"] and str(int(text)) == text
        else:
            lookup = self._id_lookup()
            ids = lookup.column("id")
            i = bisect.bisect_left(_ArrowStrings(ids), str(passage_id))
            found = i < len(ids) and ids[i].as_py() == str(passage_id)
            row = lookup.column("row")[i].as_py() if found else -1
        if not found or not start <= row < stop:
            raise KeyError(f"no passage with id {passage_id!r} in {self!r}")
        return row - start

    def get_by_id(self, passage_id: str) -> Passage:
        return self[self.row_of(passage_id)]

    def _id_lookup(self) -> pa.Table:
        if self._lookup is None:
            self._lookup = _open_part(self.directory / IDS_NAME)
        return self._lookup

    # ------------------------------------------------------------------------------------ the rest

    @property
    def corpus_checksum(self) -> str | None:
        """SHA-256 of the whole corpus as ``rag.retrieval.embed.corpus_checksum`` computes it (None for a
        view of part of the rows)."""
        if self._range == (0, self.manifest["n_passages"]):
            return self.manifest["corpus_sha256"]
        return None

    @property
    def nbytes(self) -> int:
        """Bytes of the mapped Arrow buffers of this view (on disk, not in RAM)."""
        return self._table.nbytes

    def verify(self) -> None:
        """Check every part against the SHA-256 of its record (reads all the rows once)."""
        for name in self.manifest["parts"]:
            record = json.loads((self.directory / name.replace(".arrow", ".json")).read_text())
            digest = hashlib.sha256()
            for batch in _open_part(self.directory / name).to_batches(max_chunksize=BATCH_ROWS):
                cols = batch.to_pydict()
                for pid, title, text in zip(cols["id"], cols["title"], cols["text"]):
                    digest.update(_passage_line(pid, title, text))
            if digest.hexdigest() != record["sha256"]:
                raise ArrowCorpusError(
                    f"{self.directory / name} fails its SHA-256 check: the file is damaged; convert the corpus "
                    "again (overwrite=True)"
                )

    def to_dataset(self):
        """The same rows as a ``datasets.Dataset`` over the same memory-mapped files (no copy)."""
        import datasets

        parts = [datasets.Dataset.from_file(str(self.directory / name)) for name in self.manifest["parts"]]
        full = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        start, stop = self._range
        return full if (start, stop) == (0, len(full)) else full.select(range(start, stop))


class _ArrowStrings:
    """A sorted Arrow string column seen as a list for :mod:`bisect` (one element read per probe)."""

    def __init__(self, column):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> str:
        return self.column[i].as_py()


# ---------------------------------------------------------------------------------------------- entry points


def load_passages(
    path: str | os.PathLike,
    format: str = "auto",
    strict: bool = True,
    arrow_dir: str | os.PathLike | None = None,
    split_words: int | None = None,
    split_overlap: int = 0,
    rows_per_part: int = 1_000_000,
) -> ArrowPassages:
    """Hydra target for big corpora: a converted directory is opened; a passage file is converted once
    into ``arrow_dir`` (default: ``<file>.arrow`` beside it) and opened from there on every later call.

        rag-index corpus=file corpus.name=wiki18 corpus.passages._target_=rag.data.arrow.load_passages \\
            corpus.passages.path=/data/psgs_w100.tsv
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return ArrowPassages(path)
    target = Path(arrow_dir).expanduser() if arrow_dir else path.with_name(path.name + ".arrow")
    return convert_passages(
        path,
        target,
        format=format,
        strict=strict,
        split_words=split_words,
        split_overlap=split_overlap,
        rows_per_part=rows_per_part,
    )
