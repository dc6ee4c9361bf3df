"""Prebuilt (shipped) embeddings: the first index build takes rows made by the same encoder from the same
passages instead of embedding them, and embeds anything else as usual."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag.data import miniwiki
from rag.model import tiny_bert_encoder
from rag.retrieval.embed import array_checksum, corpus_checksum, embed_corpus, open_embeddings
from rag.types import Passage

PASSAGES = [Passage(f"p{i}", f"Title {i}", f"passage number {i} about topic {i % 3}") for i in range(12)]


def no_encoding(*args, **kwargs):
    raise AssertionError("the encoder ran although prebuilt embeddings fit")


@pytest.fixture()
def shipped(tmp_path):
    """A float16 'shipped' directory made by the tiny encoder of seed 1."""
    out = tmp_path / "shipped"
    embed_corpus(tiny_bert_encoder("document", seed=1), PASSAGES, out, dtype="float16", show_progress=False)
    return out


def test_rows_of_the_same_encoder_and_passages_are_taken_not_computed(shipped, tmp_path, monkeypatch):
    encoder = tiny_bert_encoder("document", seed=1)
    fresh = embed_corpus(encoder, PASSAGES, tmp_path / "fresh", show_progress=False)  # float32, computed
    monkeypatch.setattr(type(encoder), "forward", no_encoding)
    report = embed_corpus(encoder, PASSAGES, tmp_path / "seeded", prebuilt=[shipped], show_progress=False)
    assert report.seeded == [(0, len(PASSAGES))] and not report.computed
    seeded = open_embeddings(tmp_path / "seeded", expected_rows=len(PASSAGES))
    assert seeded.dtype == np.float32
    np.testing.assert_array_equal(seeded, open_embeddings(shipped).astype(np.float32))
    np.testing.assert_allclose(seeded, open_embeddings(fresh.out_dir), atol=2e-3)  # float16 rounding only
    record = json.loads(next((tmp_path / "seeded").glob("*.json")).read_text())
    assert record["seeded_from"]["dtype"] == "float16" and record["sha256"] == array_checksum(
        np.asarray(seeded)
    )
    # a second call finds the file finished
    again = embed_corpus(encoder, PASSAGES, tmp_path / "seeded", prebuilt=[shipped], show_progress=False)
    assert again.skipped == [(0, len(PASSAGES))] and not again.seeded


@pytest.mark.parametrize("change", ["encoder", "passages", "damaged"])
def test_another_encoder_other_passages_or_a_damaged_file_are_embedded(change, shipped, tmp_path):
    encoder = tiny_bert_encoder("document", seed=2 if change == "encoder" else 1)
    passages = list(PASSAGES)
    if change == "passages":
        passages[3] = Passage("p3", "Title 3", "a passage that was edited")
    if change == "damaged":
        npy = next(shipped.glob("*.npy"))
        data = bytearray(npy.read_bytes())
        data[-1] ^= 0xFF
        npy.write_bytes(bytes(data))
    report = embed_corpus(encoder, passages, tmp_path / "out", prebuilt=[shipped], show_progress=False)
    assert report.computed == [(0, len(passages))] and not report.seeded


def test_the_shipped_mini_wiki_embeddings_fit_the_default_encoder_and_corpus():
    from rag.build import compose, instantiate

    (record_path,) = miniwiki.embeddings_dir().glob("embeds_*.json")
    record = json.loads(record_path.read_text())
    encoder = instantiate(compose("rag_index", ["doc_encoder=minilm", "corpus=miniwiki"]).doc_encoder)
    passages = miniwiki.load_corpus()
    assert record["encoder"] == {
        **encoder.settings(),
        "weights_checksum": encoder.weights_checksum(),
        "dim": 384,
    }
    assert (record["start"], record["end"], record["dtype"]) == (0, len(passages), "float16")
    assert record["passages_sha256"] == corpus_checksum(passages)
    rows = open_embeddings(miniwiki.embeddings_dir(), expected_rows=len(passages))
    assert array_checksum(np.asarray(rows)) == record["sha256"]
    # the rows are d(z) of the passages: a few recomputed agree to float16 precision
    some = encoder.encode(([p.title for p in passages[:4]], [p.text for p in passages[:4]])).numpy()
    np.testing.assert_allclose(np.asarray(rows[:4], dtype=np.float32), some, atol=2e-3)
