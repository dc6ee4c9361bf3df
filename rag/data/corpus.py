"""Passage corpora: readers for the formats the field ships Wikipedia in, 100-word splitting, a JSONL writer.

Formats (``format=``):

- ``"dpr_tsv"``: DPR's ``psgs_w100.tsv``, ``id<TAB>text<TAB>title`` with a header line and CSV quoting
  (``""`` inside a quoted field is one ``"``), read with :mod:`csv` as DPR itself does.
- ``"jsonl"``: one ``{"id", "title", "text"}`` object per line (what :func:`write_passages` writes).
- ``"jsonl_contents"``: one ``{"id", "contents"}`` object per line where ``contents`` is the title on the
  first line (usually quoted: ``"\\"Title\\"\\ntext"``) and the text after it (Pyserini / FlashRAG).
- ``"nq_gold"``: the gold passages of ``nq-open-oracle.jsonl.gz`` (NQ-open with its gold DPR passage), with
  identical passages merged and ids ``nq:<hash of title and text>`` (:func:`nq_gold_passage_id`).

Any of them may be gzip-compressed (detected from the content, not the name). ``"auto"`` detects the format
from the first line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from rag.atomic import atomic_path
from rag.data.errors import (
    DataFileNotFoundError,
    DataFormatError,
    DuplicatePassageIdError,
    SkippedRowsWarning,
)
from rag.types import Passage

PASSAGE_FORMATS = ("dpr_tsv", "jsonl", "jsonl_contents", "nq_gold")

# psgs_w100.tsv has 21M rows: above this size reading shows a progress bar.
_PROGRESS_MIN_BYTES = 64 * 2**20
_WORD = re.compile(r"\S+")


# ----------------------------------------------------------------------------------------------- file helpers


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_text(path: str | os.PathLike, what: str = "data file") -> IO[str]:
    """Open a UTF-8 text file for reading, gzip or not; a missing file raises :class:`DataFileNotFoundError`.

    ``newline=""`` so that :mod:`csv` sees quoted newlines and CRLF endings (DPR's topic files use CRLF).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(path, what, "check the path, or build/download the file first")
    if _is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def first_data_line(path: str | os.PathLike, what: str = "data file") -> str:
    """The first non-blank line of a (possibly gzipped) text file, for format detection."""
    with open_text(path, what) as f:
        for line in f:
            if line.strip():
                return line.rstrip("\r\n")
    raise DataFormatError(path, None, f"the {what} is empty", "pass a non-empty file")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically; gzip-compressed when ``path`` ends in ``.gz``.

    The gzip header carries no name and no timestamp, so the same rows give byte-identical files.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        if path.suffix == ".gz":
            sink: IO[bytes] = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9)
        else:
            sink = raw
        with io.TextIOWrapper(sink, encoding="utf-8", newline="\n") as text:
            for row in rows:
                text.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def progress_bar(rows: Iterable, path: Path, desc: str) -> Iterable:
    return tqdm(
        rows,
        desc=f"{desc} {path.name}",
        unit=" rows",
        disable=path.stat().st_size < _PROGRESS_MIN_BYTES,
        leave=False,
    )


class RowSkipper:
    """Raises on a malformed row when strict, else counts it and warns once at the end of the file."""

    def __init__(self, path: Path, strict: bool, what: str = "rows"):
        self.path, self.strict, self.what = path, strict, what
        self.count = 0
        self.first: tuple[int | None, str] | None = None

    def bad(
        self, line: int | None, reason: str, hint: str = "", error: type[DataFormatError] = DataFormatError
    ):
        if self.strict:
            raise error(
                self.path,
                line,
                reason,
                hint or "Fix the row, or pass strict=False to skip malformed rows with a warning",
            )
        self.count += 1
        if self.first is None:
            self.first = (line, reason)

    def report(self) -> None:
        if self.count:
            line, reason = self.first
            where = "" if line is None else f" at line {line}"
            warnings.warn(
                f"skipped {self.count} malformed {self.what} in {self.path} (first{where}: {reason})",
                SkippedRowsWarning,
                stacklevel=3,
            )


# -------------------------------------------------------------------------------------------------- splitting


def split_into_passages(title: str, text: str, n_words: int = 100, overlap: int = 0) -> list[str]:
    """Split ``text`` into passages of at most ``n_words`` whitespace-separated words (paper §2.2 / DPR).

    Consecutive passages share ``overlap`` words (0, the paper's setting, tiles the text). Each passage is
    the original substring from its first word to its last, so answer spans keep their exact spelling and
    spacing. The title is not counted: the model prepends it to every passage (``title / text``), and it
    is named here only so that errors can say which document was empty.
    """
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}")
    if not 0 <= overlap < n_words:
        raise ValueError(f"overlap must be in [0, n_words={n_words}), got {overlap}")
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans:
        raise ValueError(f"document {title!r} has no text to split")
    stride = n_words - overlap
    passages = []
    for start in range(0, len(spans), stride):
        end = min(start + n_words, len(spans))
        passages.append(text[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):  # with overlap, a further window would lie inside this one
            break
    return passages


def nq_gold_passage_id(title: str, text: str) -> str:
    """Stable id of an NQ-gold passage (the source has none): a hash of its title and text."""
    digest = hashlib.sha256(f"{title}\n{text}".encode()).hexdigest()
    return f"nq:{digest[:16]}"


# ---------------------------------------------------------------------------------------------------- readers


def detect_passage_format(path: str | os.PathLike) -> str:
    """Guess the passage format from the first line; raises :class:`DataFormatError` when it cannot."""
    line = first_data_line(path, "passage file")
    hint = f"pass format= one of {PASSAGE_FORMATS}"
    if line.lstrip().startswith("{"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, 1, f"first line is not valid JSON ({e.msg})", hint) from None
        keys = set(row) if isinstance(row, dict) else set()
        if "ctxs" in keys:
            return "nq_gold"
        if "contents" in keys:
            return "jsonl_contents"
        if "text" in keys:
            return "jsonl"
        raise DataFormatError(path, 1, f"unknown passage JSON keys {sorted(keys)}", hint)
    if line.split("\t")[:3] == ["id", "text", "title"]:
        return "dpr_tsv"
    raise DataFormatError(path, 1, "cannot detect the passage format from the first line", hint)


def _str_field(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise ValueError(f"missing key {key!r}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{key!r} is a {type(value).__name__}, expected a string")
    return str(value)


def _unquote_title(line: str) -> str:
    line = line.strip()
    if len(line) >= 2 and line[0] == line[-1] == '"':
        return line[1:-1].replace('""', '"')
    return line


def iter_jsonl_rows(f: IO[str]) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, object or None, error) for each non-blank line."""
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(row, dict):
            yield lineno, None, f"expected a JSON object, got {type(row).__name__}"
            continue
        yield lineno, row, ""


def _passage_from_json(row: dict, format: str) -> Passage:
    pid = _str_field(row, "id")
    if format == "jsonl":
        title, text = _str_field(row, "title"), _str_field(row, "text")
    else:
        contents = _str_field(row, "contents")
        if "\n" not in contents:
            raise ValueError('"contents" has no title line (expected "\\"Title\\"\\ntext")')
        title_line, text = contents.split("\n", 1)
        title = _unquote_title(title_line)
    return Passage(id=pid, title=title, text=text)


def _raw_passages(path: Path, format: str, skipper: RowSkipper) -> Iterator[tuple[int | None, Passage]]:
    with open_text(path, "passage file") as f:
        if format == "dpr_tsv":
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long passages; C long on Windows
            reader = csv.reader(f, delimiter="\t", quotechar='"')
            try:
                header = next(reader)
            except StopIteration:
                header = []
            if header[:3] != ["id", "text", "title"]:
                raise DataFormatError(
                    path,
                    1,
                    f"expected the header 'id<TAB>text<TAB>title', got {header[:3]}",
                    "DPR's psgs_w100.tsv starts with that line: add it, or pass the file's format=",
                )
            lineno = reader.line_num
            try:
                for row in progress_bar(reader, path, "reading"):
                    start, lineno = lineno + 1, reader.line_num
                    if not any(field.strip() for field in row):
                        continue
                    if len(row) != 3:
                        skipper.bad(
                            start, f"expected 3 tab-separated fields (id, text, title), got {len(row)}"
                        )
                        continue
                    yield start, Passage(id=row[0], title=row[2], text=row[1])
            except csv.Error as e:  # an unclosed quote runs to the end of the file
                raise DataFormatError(path, reader.line_num, f"broken CSV quoting ({e})", "") from None
            return
        if format in ("jsonl", "jsonl_contents"):
            for lineno, row, error in progress_bar(iter_jsonl_rows(f), path, "reading"):
                if row is None:
                    skipper.bad(lineno, error)
                    continue
                try:
                    yield lineno, _passage_from_json(row, format)
                except ValueError as e:
                    skipper.bad(lineno, str(e))
            return
        if format == "nq_gold":
            for lineno, row, error in progress_bar(iter_jsonl_rows(f), path, "reading"):
                if row is None:
                    skipper.bad(lineno, error)
                    continue
                try:
                    gold = gold_contexts(row)
                except ValueError as e:
                    skipper.bad(lineno, str(e))
                    continue
                for ctx in gold:
                    title, text = str(ctx["title"]), str(ctx["text"])
                    yield lineno, Passage(id=nq_gold_passage_id(title, text), title=title, text=text)
            return
    raise ValueError(f"unknown passage format {format!r}; expected 'auto' or one of {PASSAGE_FORMATS}")


def gold_contexts(row: dict) -> list[dict]:
    """The gold passages (``isgold``) among an NQ-oracle row's ``ctxs``; ValueError when there are none."""
    ctxs = row.get("ctxs")
    if not isinstance(ctxs, list) or not all(isinstance(c, dict) for c in ctxs):
        raise ValueError('missing or malformed "ctxs" (a list of {"title", "text", "isgold"} objects)')
    gold = [c for c in ctxs if c.get("isgold")]
    if not gold:
        raise ValueError('no context with "isgold": true')
    for c in gold:
        _str_field(c, "title"), _str_field(c, "text")
    return gold


def iter_passages(
    path: str | os.PathLike,
    format: str = "auto",
    strict: bool = True,
    split_words: int | None = None,
    split_overlap: int = 0,
) -> Iterator[Passage]:
    """Stream the passages of a corpus file (see the module docstring for formats).

    ``split_words`` splits every passage into pieces of at most that many words (``split_overlap`` shared
    between neighbours) with ids ``<id>:<piece>``; None keeps passages whole. With ``strict`` a malformed
    row, an empty text or a duplicate id raises :class:`DataFormatError` naming the file and line; without
    it such rows are skipped, counted and reported in one :class:`SkippedRowsWarning`.
    """
    path = Path(path)
    if format == "auto":
        format = detect_passage_format(path)
    elif format not in PASSAGE_FORMATS:
        raise ValueError(f"unknown passage format {format!r}; expected 'auto' or one of {PASSAGE_FORMATS}")
    if split_words is not None:  # fail on bad sizes before reading a 13 GB file
        split_into_passages("", "x", split_words, split_overlap)
    skipper = RowSkipper(path, strict)
    seen: set[str] = set()
    for lineno, passage in _raw_passages(path, format, skipper):
        if not passage.id.strip():
            skipper.bad(lineno, "empty passage id")
            continue
        if not passage.text.strip():
            skipper.bad(lineno, f"passage {passage.id!r} has an empty text")
            continue
        if passage.id in seen:
            if format == "nq_gold":  # the same gold passage serves several questions
                continue
            skipper.bad(
                lineno,
                f"duplicate passage id {passage.id!r}",
                "Passage ids index the corpus and must be unique: fix the file, or pass strict=False to "
                "keep the first passage with each id",
                DuplicatePassageIdError,
            )
            continue
        seen.add(passage.id)
        if split_words is None:
            yield passage
            continue
        pieces = split_into_passages(passage.title, passage.text, split_words, split_overlap)
        for i, piece in enumerate(pieces):
            yield Passage(id=f"{passage.id}:{i}", title=passage.title, text=piece)
    skipper.report()
    if not seen:
        raise DataFormatError(
            path, None, "no passages in the file", "pass a corpus with at least one passage"
        )


def read_passages(
    path: str | os.PathLike,
    format: str = "auto",
    strict: bool = True,
    split_words: int | None = None,
    split_overlap: int = 0,
) -> list[Passage]:
    """Read a whole corpus file into memory; see :func:`iter_passages` for the arguments and errors."""
    return list(iter_passages(path, format, strict, split_words, split_overlap))


def write_passages(path: str | os.PathLike, passages: Iterable[Passage]) -> Path:
    """Write passages as ``{"id", "title", "text"}`` JSONL (the ``"jsonl"`` format), atomically;
    gzip-compressed when ``path`` ends in ``.gz``."""
    return write_jsonl(path, ({"id": p.id, "title": p.title, "text": p.text} for p in passages))
