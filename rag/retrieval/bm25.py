"""BM25 over the passages (title + text), with bm25s: the sparse retriever of the paper's Table 6 ablation.

Scores are the Lucene variant of BM25 (Kamphuis et al. 2020, as Anserini/Pyserini, which DPR's BM25
baseline used): for a question q and passage z of length |z| words,

    score(q, z) = sum over query terms t (with repeats) of  idf(t) * tf(t, z) / (tf(t, z) + k1 (1 - b + b |z| / avg|z|))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with Anserini's defaults k1 = 0.9, b = 0.4. The RAG paper uses them as the document logits of p(z|x).
Text is lowercased and split into word tokens of two or more characters; English stopwords are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rag.atomic import atomic_dir
from rag.retrieval.errors import (
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    IndexStateError,
    RetrievalInputError,
)
from rag.types import Passage

FORMAT_VERSION = 1
MANIFEST = "bm25_manifest.json"
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def _stopword_set(stopwords: str | Sequence[str] | None) -> frozenset[str]:
    if stopwords is None:
        return frozenset()
    if isinstance(stopwords, str):
        if stopwords not in ("english", "en"):
            raise RetrievalInputError(
                f"stopwords={stopwords!r} is not known: use 'english', None, or a list of words"
            )
        from bm25s.stopwords import STOPWORDS_EN

        return frozenset(STOPWORDS_EN)
    return frozenset(w.lower() for w in stopwords)


class BM25Index:
    """A BM25 index over N passages: ``search(questions, n_docs) -> (doc_scores, doc_ids)``."""

    def __init__(
        self,
        k1: float = 0.9,
        b: float = 0.4,
        method: str = "lucene",
        stopwords: str | Sequence[str] | None = "english",
    ) -> None:
        if k1 < 0 or not 0 <= b <= 1:
            raise RetrievalInputError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b, self.method = float(k1), float(b), method
        self.stopwords = stopwords if isinstance(stopwords, (str, type(None))) else list(stopwords)
        self._stop = _stopword_set(stopwords)
        self._bm25 = None
        self.n_passages = 0
        self.corpus_checksum: str | None = None

    def tokenize(self, text: str) -> list[str]:
        """Lowercased word tokens of two or more characters, stopwords removed."""
        return [t for t in _TOKEN.findall(text.lower()) if t not in self._stop]

    def build(self, passages: Sequence[Passage], corpus_checksum: str | None = None) -> BM25Index:
        """Index ``title text`` of every passage; ``corpus_checksum`` is recorded for later checks."""
        import bm25s

        if len(passages) == 0:
            raise RetrievalInputError("the corpus has no passages: nothing to index")
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # its debug lines would flood a CLI's log
        bm25 = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        bm25.index([self.tokenize(f"{p.title} {p.text}") for p in passages], show_progress=False)
        self._bm25 = bm25
        self.n_passages = len(passages)
        self.corpus_checksum = corpus_checksum
        return self

    def search(self, questions: Sequence[str], n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n_docs`` passages per question: ``doc_scores`` (B, K) float32, ``doc_ids`` (B, K) int64.

        A question none of whose words occurs in the corpus scores 0 against every passage.
        """
        if self._bm25 is None:
            raise IndexStateError(
                "the BM25 index is empty: call build(passages) or BM25Index.load(directory)"
            )
        if isinstance(questions, str):
            raise RetrievalInputError("questions must be a list of strings, got a single string: wrap it")
        if not 1 <= n_docs <= self.n_passages:
            raise RetrievalInputError(
                f"n_docs={n_docs} but the BM25 index holds {self.n_passages} passages: ask for 1..{self.n_passages}"
            )
        if len(questions) == 0:
            return np.zeros((0, n_docs), np.float32), np.zeros((0, n_docs), np.int64)
        tokens = [self.tokenize(q) for q in questions]
        doc_ids, doc_scores = self._bm25.retrieve(tokens, k=n_docs, sorted=True, show_progress=False)
        return doc_scores.astype(np.float32), doc_ids.astype(np.int64)  # (B, K), (B, K)

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "bm25",
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "stopwords": self.stopwords,
            "n_passages": self.n_passages,
            "corpus_checksum": self.corpus_checksum,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index and its manifest to ``directory``, atomically (temp folder, then rename)."""
        if self._bm25 is None:
            raise IndexStateError("nothing to save: build the BM25 index first")
        directory = Path(directory).expanduser()
        with atomic_dir(directory) as tmp:
            self._bm25.save(str(tmp), show_progress=False)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=1))
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected_corpus_checksum: str | None = None,
        expected_passages: int | None = None,
        mmap: bool = False,
    ) -> BM25Index:
        """Load a saved index; a different corpus than expected raises :class:`IndexMismatchError`."""
        import bm25s

        directory = Path(directory).expanduser()
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise IndexNotFoundError(
                f"no BM25 index at {directory} (no {MANIFEST}): build one with BM25Index().build(passages).save(...)"
            )
        manifest = json.loads(manifest_path.read_text())
        differences = {}
        if expected_corpus_checksum is not None and manifest["corpus_checksum"] != expected_corpus_checksum:
            differences["corpus_checksum"] = (manifest["corpus_checksum"], expected_corpus_checksum)
        if expected_passages is not None and manifest["n_passages"] != expected_passages:
            differences["n_passages"] = (manifest["n_passages"], expected_passages)
        if differences:
            raise IndexMismatchError(
                f"the BM25 index at {directory} was built on another corpus ({differences}): delete the folder "
                "to rebuild it on this corpus",
                differences,
            )
        index = cls(
            k1=manifest["k1"], b=manifest["b"], method=manifest["method"], stopwords=manifest["stopwords"]
        )
        try:
            index._bm25 = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False)
        except (OSError, ValueError, KeyError) as err:
            raise IndexCorruptError(
                f"the BM25 index at {directory} cannot be read ({err}): delete it and rebuild"
            ) from None
        index.n_passages = manifest["n_passages"]
        index.corpus_checksum = manifest["corpus_checksum"]
        return index
