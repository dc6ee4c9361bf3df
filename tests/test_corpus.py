"""Passage readers on real rows, 100-word splitting against a brute-force reference, writers, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest

from rag.data.corpus import (
    detect_passage_format,
    nq_gold_passage_id,
    read_passages,
    split_into_passages,
    write_passages,
)
from rag.data.errors import (
    DataError,
    DataFileNotFoundError,
    DataFormatError,
    DuplicatePassageIdError,
    SkippedRowsWarning,
)
from rag.types import Passage

DATA = Path(__file__).parent / "fixtures" / "data"
BAD = DATA / "bad"


def _json_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------ readers, real rows


def test_jsonl_passages_are_the_rows_of_the_file():
    rows = _json_lines(DATA / "squad_passages.jsonl")
    passages = read_passages(DATA / "squad_passages.jsonl")
    assert passages == [Passage(r["id"], r["title"], r["text"]) for r in rows]
    assert passages[0].id == "1973_oil_crisis#0"
    assert passages[0].text.startswith("The 1973 oil crisis began in October 1973")


def test_contents_variant_takes_the_title_from_the_first_line_quoted_or_not():
    passages = read_passages(DATA / "wiki18_contents.jsonl")
    assert [p.id for p in passages] == ["0", "7", "29", "32"]
    assert [p.title for p in passages] == [
        "Evan Morris",
        "E.T. the Extra-Terrestrial (video game)",
        "Absalon",
        "Absalon",
    ]
    assert passages[0].text.startswith("Evan Morris Evan L. Morris (January 26, 1977")
    rows = _json_lines(DATA / "wiki18_contents.jsonl")
    assert [p.text for p in passages] == [r["contents"].split("\n", 1)[1] for r in rows]  # text kept verbatim


def test_dpr_tsv_undoes_csv_quoting_and_matches_the_same_passages_in_jsonl():
    raw = (DATA / "psgs_w100.tsv").read_text(encoding="utf-8")
    assert '""Havn""' in raw  # the TSV escapes quotes by doubling them
    tsv = read_passages(DATA / "psgs_w100.tsv")
    contents = read_passages(DATA / "wiki18_contents.jsonl")
    assert [(p.id, p.title) for p in tsv] == [(p.id, p.title) for p in contents]
    assert [p.text for p in tsv] == [p.text.replace('""', '"') for p in contents]
    assert 'city of "Havn" (English: Harbour)' in tsv[3].text


def test_nq_gold_passages_are_the_gold_contexts_with_identical_ones_merged():
    rows = _json_lines(DATA / "nq-open-oracle.jsonl.gz")
    passages = read_passages(DATA / "nq-open-oracle.jsonl.gz")
    # rows 3 and 4 of the fixture (NQ rows 6 and 1513) share their gold passage
    assert rows[2]["ctxs"][0]["text"] == rows[3]["ctxs"][0]["text"]
    assert len(passages) == 3
    for passage, row in zip(passages, rows[:3]):
        ctx = row["ctxs"][0]
        expected_id = "nq:" + hashlib.sha256(f"{ctx['title']}\n{ctx['text']}".encode()).hexdigest()[:16]
        assert passage == Passage(expected_id, ctx["title"], ctx["text"])
        assert nq_gold_passage_id(ctx["title"], ctx["text"]) == expected_id


@pytest.mark.parametrize(
    "name, format",
    [
        ("squad_passages.jsonl", "jsonl"),
        ("wiki18_contents.jsonl", "jsonl_contents"),
        ("psgs_w100.tsv", "dpr_tsv"),
        ("nq-open-oracle.jsonl.gz", "nq_gold"),
    ],
)
def test_auto_detection_agrees_with_the_explicit_format(name, format):
    assert detect_passage_format(DATA / name) == format
    assert read_passages(DATA / name) == read_passages(DATA / name, format=format)


def test_gzip_is_read_transparently_whatever_the_name(tmp_path):
    plain = DATA / "squad_passages.jsonl"
    for name in ("copy.jsonl.gz", "copy_without_suffix.jsonl"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(plain.read_bytes())
        assert read_passages(tmp_path / name) == read_passages(plain)


def test_reading_with_split_words_splits_every_passage_and_suffixes_ids():
    whole = read_passages(DATA / "squad_passages.jsonl")
    pieces = read_passages(DATA / "squad_passages.jsonl", split_words=50, split_overlap=10)
    for p in whole:
        mine = [q for q in pieces if q.id.rsplit(":", 1)[0] == p.id]
        assert [q.id for q in mine] == [f"{p.id}:{i}" for i in range(len(mine))]
        assert mine and all(q.title == p.title for q in mine)
        assert [q.text for q in mine] == split_into_passages(p.title, p.text, 50, 10)


# -------------------------------------------------------------------------------------------------- splitting


def _reference_windows(words: list[str], n: int, overlap: int) -> list[list[str]]:
    """Brute force: windows of n words every n - overlap words, until one reaches the end."""
    windows, start = [], 0
    while True:
        windows.append(words[start : start + n])
        if start + n >= len(words):
            return windows
        start += n - overlap


@pytest.mark.parametrize("n_words, overlap", [(100, 0), (7, 0), (7, 3), (1, 0), (5, 4)])
def test_splitting_matches_the_reference_on_real_text(n_words, overlap):
    for p in read_passages(DATA / "squad_passages.jsonl") + read_passages(DATA / "wiki18_contents.jsonl"):
        pieces = split_into_passages(p.title, p.text, n_words, overlap)
        words = p.text.split()
        assert [q.split() for q in pieces] == _reference_windows(words, n_words, overlap)
        assert all(q in p.text for q in pieces)  # exact substrings: answer spans keep their spelling
        assert all(len(q.split()) <= n_words for q in pieces)
        if overlap == 0:  # tiles the text: the pieces' words are the text's words, once each
            assert [w for q in pieces for w in q.split()] == words
            assert all(len(q.split()) == n_words for q in pieces[:-1])


def test_splitting_random_texts_with_overlap_shares_exactly_overlap_words():
    rng = random.Random(0)
    for _ in range(200):
        words = [f"w{i}" for i in range(rng.randint(1, 60))]
        text = "".join(w + rng.choice([" ", "  ", "\n", "\t "]) for w in words)
        n = rng.randint(1, 12)
        overlap = rng.randint(0, n - 1)
        pieces = [q.split() for q in split_into_passages("t", text, n, overlap)]
        assert pieces == _reference_windows(words, n, overlap)
        for a, b in zip(pieces, pieces[1:]):
            assert a[len(a) - overlap :] == b[:overlap]
        assert pieces[-1][-1] == words[-1]


def test_a_100_word_paragraph_of_103_words_gives_100_and_3():
    p = read_passages(DATA / "squad_passages.jsonl")[0]
    assert len(p.text.split()) == 103
    pieces = split_into_passages(p.title, p.text)
    assert [len(q.split()) for q in pieces] == [100, 3]
    assert pieces[1] == " ".join(p.text.split()[100:])


def test_splitting_keeps_the_original_spacing_inside_a_piece():
    assert split_into_passages("t", "a  b\nc d e", 3) == ["a  b\nc", "d e"]


@pytest.mark.parametrize("n_words, overlap", [(0, 0), (5, 5), (5, -1)])
def test_bad_split_sizes_are_refused(n_words, overlap):
    with pytest.raises(ValueError, match="n_words|overlap"):
        split_into_passages("t", "a b c", n_words, overlap)
    with pytest.raises(ValueError, match="n_words|overlap"):
        read_passages(DATA / "squad_passages.jsonl", split_words=n_words, split_overlap=overlap)


def test_splitting_an_empty_text_names_the_document():
    with pytest.raises(ValueError, match="Some Title"):
        split_into_passages("Some Title", "  \n ")


# ---------------------------------------------------------------------------------------------------- writers


def test_write_then_read_round_trips_plain_and_gzip(tmp_path):
    passages = read_passages(DATA / "wiki18_contents.jsonl") + [Passage("x", 'quo"te', "tab\there, ünïcode")]
    for name in ("out.jsonl", "out.jsonl.gz"):
        path = write_passages(tmp_path / name, passages)
        assert read_passages(path) == passages
    assert (tmp_path / "out.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.gz"]  # no temp files left


def test_gzip_output_is_byte_identical_across_writes(tmp_path):
    passages = read_passages(DATA / "squad_passages.jsonl")
    a = write_passages(tmp_path / "a.jsonl.gz", passages).read_bytes()
    b = write_passages(tmp_path / "b.jsonl.gz", passages).read_bytes()
    assert a == b
    assert a[4:8] == b"\0\0\0\0"  # gzip mtime field


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = write_passages(tmp_path / "c.jsonl", [Passage("1", "t", "old")])

    def broken():
        yield Passage("2", "t", "new")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_passages(path, broken())
    assert read_passages(path) == [Passage("1", "t", "old")]
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]


# ---------------------------------------------------------------------------------------------------- bad input


def test_a_missing_file_is_one_clear_error():
    with pytest.raises(DataFileNotFoundError, match="passage file not found: .*no_such_file.jsonl"):
        read_passages(DATA / "no_such_file.jsonl")
    with pytest.raises(FileNotFoundError):  # callers that catch the built-in still catch it
        read_passages(DATA / "no_such_file.jsonl", format="jsonl")


@pytest.mark.parametrize(
    "name, line, reason, n_good",
    [
        ("passages_bad_json.jsonl", 2, "invalid JSON", 2),
        ("passages_empty_text.jsonl", 2, "empty text", 1),
        ("passages_missing_title.jsonl", 2, "missing key 'title'", 1),
        ("psgs_wrong_fields.tsv", 3, "expected 3 tab-separated fields", 2),
        ("contents_no_title.jsonl", 2, "no title line", 1),
        ("nq_gold_no_gold.jsonl", 1, "isgold", 0),
    ],
)
def test_a_malformed_row_names_file_and_line_or_is_skipped_and_counted(name, line, reason, n_good):
    with pytest.raises(DataFormatError, match=rf"{name}:{line}: .*{reason}") as info:
        read_passages(BAD / name)
    assert (info.value.line, Path(info.value.path).name) == (line, name)
    assert "strict=False" in str(info.value)  # the message says how to go on
    if n_good == 0:
        with pytest.warns(SkippedRowsWarning), pytest.raises(DataFormatError, match="no passages"):
            read_passages(BAD / name, strict=False)
        return
    with pytest.warns(
        SkippedRowsWarning, match=rf"skipped 1 malformed rows in .*{name} \(first at line {line}: "
    ):
        passages = read_passages(BAD / name, strict=False)
    assert len(passages) == n_good


def test_duplicate_ids_raise_or_keep_the_first():
    with pytest.raises(DuplicatePassageIdError, match=r"passages_dup_ids.jsonl:3: duplicate passage id '1'"):
        read_passages(BAD / "passages_dup_ids.jsonl")
    with pytest.warns(SkippedRowsWarning, match="duplicate passage id"):
        passages = read_passages(BAD / "passages_dup_ids.jsonl", strict=False)
    assert [(p.id, p.title) for p in passages] == [("1", "Alpha"), ("2", "Beta")]


def test_a_tsv_without_header_and_an_empty_file_are_refused():
    with pytest.raises(DataFormatError, match="psgs_no_header.tsv:1: expected the header"):
        read_passages(BAD / "psgs_no_header.tsv", format="dpr_tsv")
    with pytest.raises(DataFormatError, match="cannot detect the passage format"):
        read_passages(BAD / "psgs_no_header.tsv")
    with pytest.raises(DataFormatError, match="empty"):
        read_passages(BAD / "empty.jsonl")


def test_an_unknown_format_name_is_refused():
    with pytest.raises(ValueError, match="unknown passage format 'parquet'"):
        read_passages(DATA / "squad_passages.jsonl", format="parquet")


def test_every_data_error_is_a_data_error():
    for cls in (DataFileNotFoundError, DataFormatError, DuplicatePassageIdError):
        assert issubclass(cls, DataError)
