"""Arrow-backed passages: the same rows as the readers, memory-mapped (no copy into the Arrow pool), lookup by row
and id against a dict, views, pickling, resumable atomic conversion after a real interruption, refusals."""

from __future__ import annotations

import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import rag.data.arrow as arrow
from rag.data.arrow import ArrowCorpusError, ArrowPassages, convert_passages, load_passages
from rag.data.corpus import read_passages, write_passages
from rag.data.errors import DuplicatePassageIdError
from rag.retrieval.embed import corpus_checksum
from rag.types import Passage

DATA = Path(__file__).parent / "fixtures" / "data"


def synthetic(n: int, first_id: int | None = 1) -> list[Passage]:
    """n passages; ids first_id, first_id+1, ... (DPR's layout) or, with first_id=None, arbitrary strings."""
    words = [
        "the",
        "river",
        "seine",
        "flows",
        "through",
        "paris",
        "before",
        "it",
        "reaches",
        "the",
        "sea",
        "at",
        "le",
        "havre",
    ]
    return [
        Passage(
            id=str(first_id + i) if first_id is not None else f"doc-{(i * 7919) % 1009}-{i}",
            title=f"Title {words[i % len(words)]} {i}",
            text=" ".join(words[(i + k) % len(words)] for k in range(5 + i % 20)),
        )
        for i in range(n)
    ]


def write_tsv(path: Path, passages: list[Passage]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for p in passages:
            f.write(f"{p.id}\t{p.text}\t{p.title}\n")
    return path


@pytest.mark.parametrize("name", ["psgs_w100.tsv", "wiki18_contents.jsonl", "squad_passages.jsonl"])
def test_rows_equal_the_reader_and_checksums_agree(tmp_path, name):
    reference = read_passages(DATA / name)
    passages = convert_passages(DATA / name, tmp_path / "arrow", rows_per_part=3, show_progress=False)
    assert len(passages) == len(reference) and list(passages) == reference
    assert [passages[i] for i in range(len(reference))] == reference
    assert passages.corpus_checksum == corpus_checksum(reference) == corpus_checksum(passages)
    assert passages.manifest["parts"] == ["part-00000.arrow", "part-00001.arrow"]
    passages.verify()


def test_lookup_by_row_and_id_against_a_dict(tmp_path):
    for first_id, lookup in ((1, "sequential"), (None, "ids.arrow")):
        reference = synthetic(300, first_id)
        src = write_tsv(tmp_path / f"p{first_id}.tsv", reference)
        passages = convert_passages(src, tmp_path / f"a{first_id}", rows_per_part=64, show_progress=False)
        assert passages.manifest["id_lookup"] == lookup
        by_id = {p.id: i for i, p in enumerate(reference)}
        rng = np.random.default_rng(0)
        for row in rng.integers(0, 300, 50):
            pid = reference[row].id
            assert passages.row_of(pid) == by_id[pid] == row
            assert passages.get_by_id(pid) == reference[row]
        for missing in ("0", "301", "01", "x", "doc-1"):
            with pytest.raises(KeyError, match="no passage with id"):
                passages.row_of(missing)
        rows = rng.integers(-300, 300, 40)
        assert passages.take(rows) == [reference[r] for r in rows]
        assert passages[rows] == [reference[r] for r in rows]
        with pytest.raises(IndexError):
            passages[300]


def test_views_are_slices_that_share_the_mapping(tmp_path):
    reference = synthetic(100)
    passages = convert_passages(write_tsv(tmp_path / "p.tsv", reference), tmp_path / "a", rows_per_part=30)
    view = passages[25:70]
    assert list(view) == reference[25:70] and view[-1] == reference[69]
    assert list(view[5:10]) == reference[30:35]
    assert view.row_of(reference[40].id) == 15
    with pytest.raises(KeyError):
        view.row_of(reference[10].id)  # in the corpus, not in the view
    assert view.corpus_checksum is None and corpus_checksum(view) == corpus_checksum(reference[25:70])
    assert passages[::10] == reference[::10]
    clone = pickle.loads(pickle.dumps(view))
    assert list(clone) == reference[25:70] and len(pickle.dumps(view)) < 1000  # the path, not the rows


def test_opening_maps_the_files_instead_of_loading_them(tmp_path):
    reference = synthetic(5000)
    out = tmp_path / "a"
    convert_passages(write_tsv(tmp_path / "p.tsv", reference), out, rows_per_part=2000, show_progress=False)
    on_disk = sum(p.stat().st_size for p in out.glob("part-*.arrow"))
    before = pa.total_allocated_bytes()
    passages = ArrowPassages(out)
    rows = [passages[i] for i in range(0, 5000, 97)]
    assert rows == reference[::97]
    assert passages.nbytes > 0.5 * on_disk
    # the buffers point into the memory map: Arrow's allocator holds (almost) nothing for them
    assert pa.total_allocated_bytes() - before < 0.05 * on_disk


def test_the_same_files_open_as_a_datasets_dataset(tmp_path):
    reference = synthetic(50)
    passages = convert_passages(write_tsv(tmp_path / "p.tsv", reference), tmp_path / "a", rows_per_part=20)
    dataset = passages.to_dataset()
    assert len(dataset) == 50 and dataset[7] == {
        "id": "8",
        "title": reference[7].title,
        "text": reference[7].text,
    }
    assert {f["filename"] for f in dataset.cache_files} == {
        str(tmp_path / "a" / n) for n in passages.manifest["parts"]
    }
    assert passages[10:20].to_dataset()["id"] == [p.id for p in reference[10:20]]


def test_interrupted_conversion_resumes_after_its_last_finished_part(tmp_path, monkeypatch):
    reference = synthetic(100)
    src = write_tsv(tmp_path / "p.tsv", reference)
    out = tmp_path / "a"
    real = arrow.iter_passages

    def interrupted(*args, **kwargs):
        for i, p in enumerate(real(*args, **kwargs)):
            if i == 75:
                raise KeyboardInterrupt
            yield p

    monkeypatch.setattr(arrow, "iter_passages", interrupted)
    monkeypatch.setattr(arrow, "BATCH_ROWS", 10)  # rows written per Arrow batch
    with pytest.raises(KeyboardInterrupt):
        convert_passages(src, out, rows_per_part=30, show_progress=False)
    finished = sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock"))
    assert finished == ["part-00000.arrow", "part-00000.json", "part-00001.arrow", "part-00001.json"]
    with pytest.raises(ArrowCorpusError, match="interrupted.*resume"):
        ArrowPassages(out)
    kept = {n: (out / n).stat().st_ino for n in ("part-00000.arrow", "part-00001.arrow")}
    monkeypatch.setattr(arrow, "iter_passages", real)
    passages = convert_passages(src, out, rows_per_part=30, show_progress=False)
    assert list(passages) == reference and passages.corpus_checksum == corpus_checksum(reference)
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # finished parts were not written again
    assert passages.manifest["part_rows"] == [30, 30, 30, 10]


def test_a_finished_conversion_is_reused_and_a_changed_source_refused(tmp_path):
    reference = synthetic(40)
    src = write_tsv(tmp_path / "p.tsv", reference)
    convert_passages(src, tmp_path / "a", show_progress=False)
    stamp = (tmp_path / "a" / "passages.json").stat().st_mtime_ns
    write_tsv(src, reference)  # the same rows written again: only the modification time changes
    assert list(convert_passages(src, tmp_path / "a")) == reference
    assert (tmp_path / "a" / "passages.json").stat().st_mtime_ns == stamp
    write_tsv(src, reference[:39])
    with pytest.raises(ArrowCorpusError, match="differs from .* overwrite=True"):
        convert_passages(src, tmp_path / "a")
    assert list(convert_passages(src, tmp_path / "a", overwrite=True)) == reference[:39]


def test_load_passages_converts_once_beside_the_file(tmp_path, capsys):
    src = shutil.copy(DATA / "psgs_w100.tsv", tmp_path / "psgs_w100.tsv")
    first = load_passages(src)
    assert first.directory == tmp_path / "psgs_w100.tsv.arrow"
    second = load_passages(src)
    assert list(second) == read_passages(src)
    assert capsys.readouterr().err.count("converting") == 1
    assert list(load_passages(tmp_path / "psgs_w100.tsv.arrow")) == list(first)


def test_concurrent_conversions_convert_once(tmp_path, capsys):
    src = write_tsv(tmp_path / "p.tsv", synthetic(500))
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(list(convert_passages(src, tmp_path / "a", rows_per_part=50)))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r == results[0] for r in results) and len(results[0]) == 500
    assert capsys.readouterr().err.count("converting") == 1


def test_bad_input_is_refused_with_the_fix(tmp_path):
    with pytest.raises(DuplicatePassageIdError, match="duplicate passage id"):
        convert_passages(DATA / "bad" / "passages_dup_ids.jsonl", tmp_path / "dup")
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        lenient = convert_passages(DATA / "bad" / "passages_dup_ids.jsonl", tmp_path / "dup2", strict=False)
    assert len({p.id for p in lenient}) == len(lenient)
    with pytest.raises(ArrowCorpusError, match="not a finished Arrow corpus.*convert a passage file"):
        ArrowPassages(tmp_path)
    with pytest.raises(FileNotFoundError, match="passage file not found"):
        convert_passages(tmp_path / "missing.tsv", tmp_path / "x")
    passages = convert_passages(DATA / "psgs_w100.tsv", tmp_path / "ok", rows_per_part=2)
    (tmp_path / "ok" / "part-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises((ArrowCorpusError, pa.ArrowInvalid)):
        ArrowPassages(tmp_path / "ok")
    del passages


def test_embedding_an_arrow_corpus_equals_embedding_the_list(tmp_path):
    from rag.model import tiny_bert_encoder
    from rag.retrieval.embed import embed_corpus, open_embeddings, read_embeddings_meta

    reference = read_passages(DATA / "squad_passages.jsonl")
    write_passages(tmp_path / "p.jsonl", reference)
    passages = load_passages(tmp_path / "p.jsonl")
    encoder = tiny_bert_encoder("document")
    embed_corpus(encoder, reference, tmp_path / "list", rows_per_file=2, show_progress=False)
    # the list's finished files are valid for the Arrow corpus: same rows, same checksums, nothing recomputed
    shutil.copytree(tmp_path / "list", tmp_path / "arrow")
    report = embed_corpus(encoder, passages, tmp_path / "arrow", rows_per_file=2, show_progress=False)
    assert report.computed == [] and report.skipped == [(0, 2), (2, 4)]
    embed_corpus(encoder, passages, tmp_path / "fresh", rows_per_file=2, show_progress=False)
    np.testing.assert_array_equal(
        np.asarray(open_embeddings(tmp_path / "fresh")), np.asarray(open_embeddings(tmp_path / "list"))
    )
    assert [m["passages_sha256"] for m in read_embeddings_meta(tmp_path / "fresh")] == [
        m["passages_sha256"] for m in read_embeddings_meta(tmp_path / "list")
    ]
