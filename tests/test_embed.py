"""Corpus embedding: values against the encoder itself, resumption after a real interruption, sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from rag.retrieval.embed import (
    EmbeddingsError,
    ShardedEmbeddings,
    consolidate_embeddings,
    corpus_checksum,
    embed_corpus,
    open_embeddings,
    shard_range,
)
from rag.retrieval.encoders import load_document_encoder
from rag.retrieval.errors import RetrievalInputError
from rag.types import Passage

TINY = Path(__file__).parent / "fixtures" / "tiny_bert"
SENTENCE = "the city of paris is the capital of france and the largest city on the river seine"
WORDS = SENTENCE.split(" ")
PASSAGES = [
    Passage(id=f"p{i}", title=f"title {WORDS[i % len(WORDS)]}", text=" ".join(WORDS[: 3 + (7 * i) % 14]))
    for i in range(10)
]


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    BertModel(BertConfig.from_pretrained(TINY)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def encoder(tiny_dir):
    return load_document_encoder(str(tiny_dir), pooling="mean", normalize=True)


def reference(encoder, passages=PASSAGES) -> np.ndarray:
    return encoder.encode(([p.title for p in passages], [p.text for p in passages])).numpy()


def counting(encoder, fail_after: int | None = None) -> list:
    """Wrap ``encoder.forward`` to count batches and optionally raise after ``fail_after`` of them."""
    calls, forward = [], encoder.forward

    def wrapped(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated interrupt")
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    encoder.forward = wrapped
    return calls


def test_embeddings_equal_the_encoder_output(encoder, tmp_path):
    report = embed_corpus(encoder, PASSAGES, tmp_path, batch_size=3, rows_per_file=4, show_progress=False)
    assert report.computed == [(0, 4), (4, 8), (8, 10)] and report.skipped == []
    embeds = open_embeddings(tmp_path, expected_rows=10, verify=True)
    assert isinstance(embeds, ShardedEmbeddings) and embeds.shape == (10, encoder.dim)
    expected = reference(encoder)
    np.testing.assert_allclose(np.asarray(embeds), expected, atol=1e-5)
    ids = np.array([[9, 0], [4, 3]])
    np.testing.assert_allclose(embeds[ids], expected[ids], atol=1e-5)
    np.testing.assert_allclose(embeds[2:7], expected[2:7], atol=1e-5)
    np.testing.assert_allclose(embeds[-1], expected[-1], atol=1e-5)
    meta = json.loads((tmp_path / "embeds_0000000004_0000000008.json").read_text())
    assert meta["count"] == 4 and meta["passages_sha256"] == corpus_checksum(PASSAGES[4:8])


def test_one_file_opens_as_a_memmap_and_float16_storage(encoder, tmp_path):
    embed_corpus(encoder, PASSAGES, tmp_path, dtype="float16", show_progress=False)
    embeds = open_embeddings(tmp_path)
    assert isinstance(embeds, np.memmap) and embeds.dtype == np.float16 and embeds.shape == (10, 32)
    np.testing.assert_allclose(embeds.astype(np.float32), reference(encoder), atol=2e-3)


def test_batches_are_length_sorted(encoder, tmp_path):
    calls = counting(encoder)
    seen = []
    forward = encoder.forward

    def record(*args, **kwargs):
        seen.append(kwargs["attention_mask"].sum(1).tolist())
        return forward(*args, **kwargs)

    encoder.forward = record
    embed_corpus(encoder, PASSAGES, tmp_path, batch_size=3, show_progress=False)
    lengths = [n for batch in seen for n in batch]
    assert lengths == sorted(lengths, reverse=True) and len(calls) == 4
    # each batch pads only to its own longest passage
    assert min(len(b) for b in seen) >= 1 and len(set(max(b) for b in seen)) > 1


def test_interrupted_run_resumes_without_recomputing_finished_files(encoder, tmp_path):
    full = tmp_path / "full"
    embed_corpus(encoder, PASSAGES, full, batch_size=2, rows_per_file=4, show_progress=False)

    part = tmp_path / "part"
    calls = counting(encoder, fail_after=4)  # files 0-4 and 4-8 take two batches each; 8-10 is cut
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(encoder, PASSAGES, part, batch_size=2, rows_per_file=4, show_progress=False)
    assert len(calls) == 4
    names = sorted(p.name for p in part.iterdir())
    assert names == [
        f"embeds_{a:010d}_{b:010d}.{ext}" for a, b in ((0, 4), (4, 8)) for ext in ("json", "npy")
    ]
    with pytest.raises(EmbeddingsError, match="rows 8..9 are missing"):
        open_embeddings(part, expected_rows=10)
    stamps = {p.name: p.stat().st_mtime_ns for p in part.iterdir()}

    del encoder.forward  # back to the class's forward
    calls = counting(encoder)
    report = embed_corpus(encoder, PASSAGES, part, batch_size=2, rows_per_file=4, show_progress=False)
    assert report.skipped == [(0, 4), (4, 8)] and report.computed == [(8, 10)]
    assert calls == [2]  # only the unfinished file's one batch
    assert all((part / name).stat().st_mtime_ns == t for name, t in stamps.items())
    np.testing.assert_array_equal(
        np.asarray(open_embeddings(part, 10)), np.asarray(open_embeddings(full, 10))
    )


def test_a_data_file_without_its_record_is_not_finished(encoder, tmp_path, monkeypatch):
    import rag.retrieval.embed as embed_module

    def crash(path, data, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(embed_module, "write_json_atomic", crash)
    with pytest.raises(OSError, match="disk full"):
        embed_corpus(encoder, PASSAGES, tmp_path, show_progress=False)
    assert (tmp_path / "embeds_0000000000_0000000010.npy").is_file()
    with pytest.raises(EmbeddingsError, match="no finished embeddings"):
        open_embeddings(tmp_path)
    monkeypatch.undo()
    report = embed_corpus(encoder, PASSAGES, tmp_path, show_progress=False)
    assert report.computed == [(0, 10)]


def test_shards_of_many_machines_combine(encoder, tmp_path):
    single = tmp_path / "single"
    embed_corpus(encoder, PASSAGES, single, show_progress=False)
    multi = tmp_path / "multi"
    first = embed_corpus(encoder, PASSAGES, multi, shard=0, num_shards=2, show_progress=False)
    assert first.rows == (0, 5)
    with pytest.raises(EmbeddingsError, match="rows 5..9 are missing"):
        open_embeddings(multi, expected_rows=10)
    embed_corpus(encoder, PASSAGES, multi, shard=1, num_shards=2, show_progress=False)
    np.testing.assert_allclose(
        np.asarray(open_embeddings(multi, 10)), np.asarray(open_embeddings(single)), atol=1e-6
    )
    assert [shard_range(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_rerun_with_another_encoder_or_corpus_is_refused(encoder, tiny_dir, tmp_path):
    embed_corpus(encoder, PASSAGES, tmp_path, show_progress=False)
    other = load_document_encoder(
        str(save_tiny_bert(tmp_path / "other", seed=3)), pooling="mean", normalize=True
    )
    with pytest.raises(EmbeddingsError, match="encoder settings differ.*weights_checksum"):
        embed_corpus(other, PASSAGES, tmp_path / "", show_progress=False)
    cls_pooled = load_document_encoder(str(tiny_dir), pooling="cls", normalize=True)
    with pytest.raises(EmbeddingsError, match="pooling"):
        embed_corpus(cls_pooled, PASSAGES, tmp_path, show_progress=False)
    changed = [*PASSAGES[:-1], Passage(id="p9", title="t", text="another text")]
    with pytest.raises(EmbeddingsError, match="passages of these rows differ"):
        embed_corpus(encoder, changed, tmp_path, show_progress=False)
    with pytest.raises(EmbeddingsError, match="dtype float32 was stored, float16"):
        embed_corpus(encoder, PASSAGES, tmp_path, dtype="float16", show_progress=False)
    report = embed_corpus(other, PASSAGES, tmp_path, overwrite=True, show_progress=False)
    assert report.computed == [(0, 10)]
    np.testing.assert_allclose(open_embeddings(tmp_path), reference(other), atol=1e-5)


def test_damaged_files_and_bad_arguments(encoder, tmp_path):
    embed_corpus(encoder, PASSAGES, tmp_path, show_progress=False)
    npy = tmp_path / "embeds_0000000000_0000000010.npy"
    data = bytearray(npy.read_bytes())
    data[-3] ^= 0xFF
    npy.write_bytes(bytes(data))
    with pytest.raises(EmbeddingsError, match="SHA-256"):
        open_embeddings(tmp_path, verify=True)
    with pytest.raises(EmbeddingsError, match="holds embeddings of 10 passages, the corpus has 12"):
        open_embeddings(tmp_path, expected_rows=12)
    with pytest.raises(EmbeddingsError, match="no embeddings directory"):
        open_embeddings(tmp_path / "nowhere")
    with pytest.raises(RetrievalInputError, match="dtype must be one of"):
        embed_corpus(encoder, PASSAGES, tmp_path, dtype="int8")
    with pytest.raises(RetrievalInputError, match="shard must be in 0..1"):
        embed_corpus(encoder, PASSAGES, tmp_path, shard=2, num_shards=2)
    with pytest.raises(RetrievalInputError, match="no passages"):
        embed_corpus(encoder, [], tmp_path)


KILLED_RUN = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from rag.retrieval.encoders import load_document_encoder
    from rag.retrieval.embed import embed_corpus
    from rag.types import Passage
    encoder = load_document_encoder(sys.argv[1], pooling="mean", normalize=True)
    forward = encoder.forward
    def slow(*args, **kwargs):
        time.sleep(0.3)  # slow enough for the parent to kill it between two files
        return forward(*args, **kwargs)
    encoder.forward = slow
    passages = [Passage(id=f"p{i}", title="paris", text="the city of paris " * (1 + i % 5)) for i in range(40)]
    embed_corpus(encoder, passages, sys.argv[2], batch_size=2, rows_per_file=4, show_progress=False)
    """
)


def test_killed_subprocess_resumes(tiny_dir, tmp_path):
    """SIGKILL a real embedding process midway, then finish the job in this process."""
    out = tmp_path / "emb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tiny_dir), str(out)], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("*.json"))) < 2:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = sorted(p.name for p in out.glob("*.json"))
    assert 2 <= len(finished) < 10, "the run should have been killed between its first and last file"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}

    encoder = load_document_encoder(str(tiny_dir), pooling="mean", normalize=True)
    passages = [
        Passage(id=f"p{i}", title="paris", text="the city of paris " * (1 + i % 5)) for i in range(40)
    ]
    report = embed_corpus(encoder, passages, out, batch_size=2, rows_per_file=4, show_progress=False)
    assert len(report.skipped) == len(finished) and len(report.skipped) + len(report.computed) == 10
    for lo, hi in report.skipped:
        name = f"embeds_{lo:010d}_{hi:010d}.npy"
        assert (out / name).stat().st_mtime_ns == stamps[name]
    assert not list(out.glob("*.tmp-*"))  # the killed run's half-written file was cleared away
    np.testing.assert_allclose(open_embeddings(out, 40, verify=True), reference(encoder, passages), atol=1e-5)


def test_consolidation_merges_files_into_one_memmap(encoder, tmp_path, monkeypatch):
    import rag.retrieval.embed as embed_module

    embed_corpus(encoder, PASSAGES, tmp_path, batch_size=3, rows_per_file=4, show_progress=False)
    before = np.asarray(open_embeddings(tmp_path))

    def crash(directory, metas):
        raise KeyboardInterrupt("interrupted before the parts were removed")

    monkeypatch.setattr(embed_module, "_remove_records", crash)
    with pytest.raises(KeyboardInterrupt):
        consolidate_embeddings(tmp_path, PASSAGES, show_progress=False)
    # merged file and parts side by side: the merged one wins, nothing overlaps
    halfway = open_embeddings(tmp_path, expected_rows=10)
    assert isinstance(halfway, np.memmap)
    monkeypatch.undo()

    merged = consolidate_embeddings(tmp_path, PASSAGES, show_progress=False)
    assert isinstance(merged, np.memmap)
    np.testing.assert_array_equal(merged, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embeds_0000000000_0000000010.json",
        "embeds_0000000000_0000000010.npy",
    ]
    open_embeddings(tmp_path, verify=True)
    # a rerun with the original file size finds every row done in the merged file
    calls = counting(encoder)
    report = embed_corpus(encoder, PASSAGES, tmp_path, batch_size=3, rows_per_file=4, show_progress=False)
    assert calls == [] and report.skipped == [(0, 4), (4, 8), (8, 10)]
    changed = [*PASSAGES[:-1], Passage(id="p9", title="t", text="another text")]
    with pytest.raises(EmbeddingsError, match="passages of these rows differ"):
        embed_corpus(encoder, changed, tmp_path, rows_per_file=4, show_progress=False)
    # overwrite replaces the merged file by fresh parts
    report = embed_corpus(encoder, PASSAGES, tmp_path, rows_per_file=4, overwrite=True, show_progress=False)
    assert report.computed == [(0, 4), (4, 8), (8, 10)]
    assert len(list(tmp_path.glob("*.json"))) == 3
