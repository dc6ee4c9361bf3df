"""BM25 against a brute-force evaluation of the Lucene BM25 formula on a tiny corpus."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest

from rag.retrieval.bm25 import BM25Index
from rag.retrieval.errors import IndexMismatchError, IndexNotFoundError, IndexStateError, RetrievalInputError
from rag.types import Passage

PASSAGES = [
    Passage("p0", "Paris", "Paris is the capital and largest city of France, on the river Seine."),
    Passage("p1", "Seine", "The Seine is a river in northern France that flows through Paris to the sea."),
    Passage("p2", "Nile", "The Nile is a major river of Africa, flowing north through Egypt and Sudan."),
    Passage("p3", "Egypt", "Egypt is a country in Africa; its capital is Cairo, on the Nile."),
    Passage("p4", "Berlin", "Berlin is the capital and largest city of Germany by population."),
    Passage("p5", "Rhine", "The Rhine flows from Switzerland through Germany and the Netherlands."),
    Passage("p6", "Thames", "The Thames is a river of England that flows through London."),
    Passage("p7", "London", "London is the capital of England and of the United Kingdom."),
    Passage("p8", "Rome", "Rome is the capital of Italy and was the centre of the Roman Empire."),
    Passage("p9", "Tiber", "The Tiber flows through Rome; Rome was founded on its banks, the Tiber river."),
    Passage("p10", "Cairo", "Cairo is the largest city of Egypt and of the Arab world."),
    Passage("p11", "Football", "Football is a team game played with a ball by two teams of eleven players."),
]
QUESTIONS = [
    "what river flows through paris",
    "capital city of egypt",
    "largest city in germany",
    "which river runs through rome, the tiber or the rhine",
    "team game with ball",
    "capital capital england",  # a repeated query term counts twice, as in Lucene
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]{2,}", text.lower())


def brute_force_scores(question: str, k1: float, b: float) -> np.ndarray:
    docs = [words(f"{p.title} {p.text}") for p in PASSAGES]
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    df = Counter(t for d in docs for t in set(d))
    scores = np.zeros(n)
    for j, doc in enumerate(docs):
        tf = Counter(doc)
        for term in words(question):
            if df[term] == 0:
                continue
            idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
            scores[j] += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(doc) / avgdl))
    return scores


@pytest.mark.parametrize(("k1", "b"), [(0.9, 0.4), (1.5, 0.75)])
def test_scores_equal_brute_force_bm25(k1, b):
    index = BM25Index(k1=k1, b=b, stopwords=None).build(PASSAGES)
    doc_scores, doc_ids = index.search(QUESTIONS, n_docs=5)
    assert doc_scores.shape == doc_ids.shape == (len(QUESTIONS), 5)
    assert doc_scores.dtype == np.float32 and doc_ids.dtype == np.int64
    for q, question in enumerate(QUESTIONS):
        reference = brute_force_scores(question, k1, b)
        # the returned ids carry their true scores, and these are the 5 best scores in order (ties aside)
        np.testing.assert_allclose(doc_scores[q], reference[doc_ids[q]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(doc_scores[q], np.sort(reference)[::-1][:5], rtol=1e-5, atol=1e-6)
    assert doc_ids[0, 0] in (0, 1) and doc_ids[1, 0] in (3, 10) and doc_ids[4, 0] == 11


def test_stopwords_are_dropped_and_unknown_words_score_zero():
    index = BM25Index().build(PASSAGES)
    assert index.tokenize("The capital of the Kingdom") == ["capital", "kingdom"]
    scores, _ = index.search(["the of and", "zyzzyva quux"], n_docs=3)
    np.testing.assert_array_equal(scores, 0.0)
    with_stop, _ = index.search(["the capital of italy"], n_docs=1)
    without, ids = index.search(["capital italy"], n_docs=1)
    np.testing.assert_allclose(with_stop, without)
    assert PASSAGES[ids[0, 0]].title == "Rome"


def test_save_load_roundtrip_and_corpus_check(tmp_path):
    index = BM25Index().build(PASSAGES, corpus_checksum="abc")
    index.save(tmp_path / "bm25")
    index.save(tmp_path / "bm25")  # saving over an existing index replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25"]
    loaded = BM25Index.load(tmp_path / "bm25", expected_corpus_checksum="abc", expected_passages=12)
    for got, want in zip(loaded.search(QUESTIONS, 4), index.search(QUESTIONS, 4)):
        np.testing.assert_array_equal(got, want)
    assert (loaded.k1, loaded.b, loaded.n_passages) == (0.9, 0.4, 12)
    with pytest.raises(IndexMismatchError, match="another corpus") as err:
        BM25Index.load(tmp_path / "bm25", expected_corpus_checksum="xyz")
    assert err.value.differences == {"corpus_checksum": ("abc", "xyz")}
    with pytest.raises(IndexNotFoundError, match="no BM25 index"):
        BM25Index.load(tmp_path / "missing")


def test_bad_requests_are_refused():
    with pytest.raises(IndexStateError, match="empty"):
        BM25Index().search(["paris"], 1)
    index = BM25Index().build(PASSAGES)
    with pytest.raises(RetrievalInputError, match="n_docs=13 but the BM25 index holds 12 passages"):
        index.search(["paris"], 13)
    with pytest.raises(RetrievalInputError, match="single string"):
        index.search("paris", 2)
    with pytest.raises(RetrievalInputError, match="k1 >= 0"):
        BM25Index(b=2.0)
    with pytest.raises(RetrievalInputError, match="no passages"):
        BM25Index().build([])
