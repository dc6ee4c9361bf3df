"""One retrieval interface over dense (FAISS / exact) and BM25 search.

``retrieve(questions, n_docs) -> RetrievalOutput`` gives, for B questions and K = ``n_docs``:
``doc_ids`` (B, K) rows of the corpus, ``doc_scores`` (B, K) the retrieval logits of p(z|x), the
passages, and for dense retrieval ``retrieved_doc_embeds`` (B, K, D) and ``question_embeds`` (B, D).

Dense ``doc_scores`` are recomputed as ``einsum("bd,bkd->bk", question_embeds, retrieved_doc_embeds)``
from the stored document embeddings, so they are exact inner products even behind a compressed index and
they carry the gradient to the query encoder when ``question_embeds`` has one (the paper's learned
retriever, §2.2 and §3.1: the index and the document encoder stay fixed). A training step that has its
question embeddings already calls ``retrieve_by_embeds``.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rag.atomic import write_json_atomic
from rag.retrieval.arrays import check_n_docs
from rag.retrieval.base import DenseIndex
from rag.retrieval.bm25 import BM25Index
from rag.retrieval.embed import corpus_checksum, embeddings_encoder_record, open_embeddings
from rag.retrieval.encoders import BertEncoder
from rag.retrieval.errors import IndexMismatchError, RetrievalError, RetrievalInputError
from rag.retrieval.manifest import IndexManifest, read_manifest
from rag.types import Passage, RetrievalOutput

#: file beside an index (written by rag-index) naming the embeddings directory it was built from
SOURCE_NAME = "source.json"


def check_questions(questions: Sequence[str]) -> list[str]:
    """The questions as a list, or a clear error for a bare string, a non-string or an empty question."""
    if isinstance(questions, str):
        raise RetrievalInputError(
            f"questions must be a list of strings, got the single string {questions[:40]!r}: wrap it in a list"
        )
    questions = list(questions)
    for i, question in enumerate(questions):
        if not isinstance(question, str):
            raise RetrievalInputError(f"question {i} is a {type(question).__name__}, not a string")
        if not question.strip():
            raise RetrievalInputError(
                f"question {i} is empty: every question needs some words to retrieve with"
            )
    return questions


class Retriever:
    """Base class: ``retrieve(questions, n_docs) -> RetrievalOutput`` over a fixed list of passages."""

    kind = ""

    def __init__(self, passages: Sequence[Passage]) -> None:
        if len(passages) == 0:
            raise RetrievalInputError("the retriever needs a corpus of at least one passage")
        self.passages = passages

    @property
    def n_passages(self) -> int:
        return len(self.passages)

    def retrieve(self, questions: Sequence[str], n_docs: int) -> RetrievalOutput:
        raise NotImplementedError

    def retrieve_by_embeds(self, question_embeds: torch.Tensor, n_docs: int) -> RetrievalOutput:
        raise RetrievalInputError(f"the {self.kind} retriever searches by text, not by question embeddings")

    def _passages_of(self, doc_ids: np.ndarray) -> list[list[Passage]]:
        return [[self.passages[i] for i in row] for row in doc_ids.tolist()]


class DenseRetriever(Retriever):
    """Maximum inner product retrieval: a query encoder q(x) over a :class:`DenseIndex` of d(z).

    Args:
        index: the built index over the N passages (rows in corpus order): a :class:`DenseIndex`, or a
            :class:`~rag.retrieval.sharded.ShardedIndex` split across DDP ranks (then every retrieval is
            collective: each rank retrieves for its own questions, all ranks at once, and reads the retrieved
            rows' vectors from ``doc_embeds``, which every rank maps whole).
        passages: the N passages, in the order of the index rows.
        query_encoder: q(x); its dimension must equal the index's. Needed by ``retrieve``, not by
            ``retrieve_by_embeds``.
        doc_embeds: the (N, D) embeddings the index was built from (a memmap from ``open_embeddings``
            is read row by row, never copied whole). None: vectors come from ``index.reconstruct``,
            which is approximate for compressed kinds.
        encode_batch_size: questions per query-encoder batch in ``retrieve``.
    """

    kind = "dense"

    def __init__(
        self,
        index: DenseIndex,
        passages: Sequence[Passage],
        query_encoder: BertEncoder | None = None,
        doc_embeds=None,
        encode_batch_size: int = 64,
    ) -> None:
        super().__init__(passages)
        if index.ntotal != len(passages):
            raise RetrievalInputError(
                f"the index holds {index.ntotal} passages but {len(passages)} passages were given: the index "
                "was built on another corpus; rebuild it with rag-index or pass the corpus it was built on"
            )
        if query_encoder is not None and query_encoder.dim != index.dim:
            raise RetrievalInputError(
                f"the query encoder {query_encoder.name!r} makes {query_encoder.dim}-d vectors but the index "
                f"holds {index.dim}-d ones: use the query encoder that matches the document encoder of the "
                "index (for DPR, the question encoder paired with the context encoder), or rebuild the index"
            )
        if doc_embeds is not None and tuple(doc_embeds.shape) != (index.ntotal, index.dim):
            raise RetrievalInputError(
                f"doc_embeds has shape {tuple(doc_embeds.shape)} but the index holds ({index.ntotal}, "
                f"{index.dim}): pass the embeddings the index was built from"
            )
        self.index = index
        self.query_encoder = query_encoder
        self.doc_embeds = doc_embeds
        self.encode_batch_size = encode_batch_size

    @classmethod
    def from_directory(
        cls,
        index_dir: str | os.PathLike,
        passages: Sequence[Passage],
        query_encoder: BertEncoder | None = None,
        embeddings_dir: str | os.PathLike | None = None,
        doc_encoder_name: str | None = None,
        doc_encoder_checksum: str | None = None,
        encode_batch_size: int = 64,
        verbose: bool = False,
    ) -> DenseRetriever:
        """Load the index saved in ``index_dir`` (by ``rag-index``) and check that it fits.

        The index must have been built on exactly ``passages`` (corpus checksum and count) and, when given,
        by the document encoder ``doc_encoder_name`` / ``doc_encoder_checksum``; otherwise
        :class:`IndexMismatchError` says what differs and how to rebuild. ``embeddings_dir`` (default: the
        manifest's record of it) supplies the exact document vectors for ``retrieved_doc_embeds``.
        """
        expected = IndexManifest(
            encoder_name=doc_encoder_name or "",
            encoder_checksum=doc_encoder_checksum or "",
            corpus_checksum=corpus_checksum(passages),
            n_passages=len(passages),
        )
        index = DenseIndex.load(index_dir, expected=expected, verbose=verbose)
        manifest = read_manifest(index_dir)
        doc_embeds = None
        if embeddings_dir is None:
            embeddings_dir = read_index_source(index_dir).get("embeddings_dir")
        if embeddings_dir is not None and Path(embeddings_dir).expanduser().is_dir():
            record = embeddings_encoder_record(embeddings_dir)
            if manifest.encoder_checksum and record["weights_checksum"] != manifest.encoder_checksum:
                raise IndexMismatchError(
                    f"the embeddings in {embeddings_dir} come from encoder {record['name']!r} "
                    f"({record['weights_checksum'][:12]}...) but the index in {index_dir} from "
                    f"{manifest.encoder_name!r} ({manifest.encoder_checksum[:12]}...): rebuild both with rag-index",
                    {"encoder_checksum": (record["weights_checksum"], manifest.encoder_checksum)},
                )
            doc_embeds = open_embeddings(embeddings_dir, expected_rows=len(passages))
        return cls(index, passages, query_encoder, doc_embeds=doc_embeds, encode_batch_size=encode_batch_size)

    @property
    def dim(self) -> int:
        return int(self.index.dim)

    def retrieve(self, questions: Sequence[str], n_docs: int) -> RetrievalOutput:
        """Encode the B questions with q(x) (following the caller's grad mode) and retrieve K passages each."""
        questions = check_questions(questions)
        if self.query_encoder is None:
            raise RetrievalInputError(
                "this dense retriever has no query encoder: pass query_encoder=..., or call retrieve_by_embeds"
            )
        check_n_docs(n_docs, self.n_passages, "the corpus")
        question_embeds = self.query_encoder.encode(questions, batch_size=self.encode_batch_size)  # (B, D)
        return self.retrieve_by_embeds(question_embeds, n_docs)

    def retrieve_by_embeds(self, question_embeds: torch.Tensor, n_docs: int) -> RetrievalOutput:
        """Retrieve K passages for question embeddings (B, D); ``doc_scores`` keep their gradient."""
        n_docs = check_n_docs(n_docs, self.n_passages, "the corpus")
        if not isinstance(question_embeds, torch.Tensor) or question_embeds.ndim != 2:
            raise RetrievalInputError(
                f"question_embeds must be a (B, D) tensor, got {type(question_embeds).__name__} "
                f"{tuple(getattr(question_embeds, 'shape', ()))}"
            )
        if question_embeds.shape[1] != self.dim:
            raise RetrievalInputError(
                f"question_embeds are {question_embeds.shape[1]}-d but the index holds {self.dim}-d vectors: "
                "use the query encoder that matches the index's document encoder"
            )
        queries = question_embeds.detach().float().cpu().numpy()
        _, doc_ids = self.index.search(queries, n_docs)  # (B, K)
        if (doc_ids < 0).any():
            raise RetrievalError(
                f"the {self.index.kind} index found fewer than n_docs={n_docs} passages for some questions: "
                "raise its search parameter (ef_search / nprobe) or use the flat index"
            )
        retrieved_doc_embeds = torch.from_numpy(self._doc_vectors(doc_ids)).to(
            device=question_embeds.device, dtype=question_embeds.dtype
        )  # (B, K, D)
        doc_scores = torch.einsum("bd,bkd->bk", question_embeds, retrieved_doc_embeds)  # (B, K)
        # exact scores may reorder what an approximate index returned: keep the best first
        order = torch.argsort(doc_scores.detach(), dim=1, descending=True, stable=True)  # (B, K)
        doc_scores = doc_scores.gather(1, order)
        retrieved_doc_embeds = retrieved_doc_embeds.gather(
            1, order.unsqueeze(-1).expand_as(retrieved_doc_embeds)
        )  # (B, K, D)
        doc_ids = np.take_along_axis(doc_ids, order.cpu().numpy(), axis=1)
        return RetrievalOutput(
            doc_ids=torch.from_numpy(doc_ids).to(question_embeds.device),
            doc_scores=doc_scores,
            passages=self._passages_of(doc_ids),
            retrieved_doc_embeds=retrieved_doc_embeds,
            question_embeds=question_embeds,
        )

    # -- index hot-swap (paper section 4.5): new retrievers over other passage sets, same query encoder --

    def _fresh_index(self) -> DenseIndex:
        params = {**self.index.params(), "verbose": False}
        return type(self.index)(**params)

    def all_doc_vectors(self) -> np.ndarray:
        """The stored d(z) of every passage, (N, D) float32, in index order."""
        return self._doc_vectors(np.arange(self.n_passages)[None, :])[0]

    def subset(self, rows: Sequence[int]) -> DenseRetriever:
        """A retriever over the passages at ``rows`` (corpus order) only: a new index of the same kind built
        from their stored vectors. The documents' encoder is not run again."""
        rows = np.asarray(sorted(set(int(r) for r in rows)), dtype=np.int64)
        if rows.size == 0:
            raise RetrievalInputError("the subset is empty: keep at least one passage")
        if rows[0] < 0 or rows[-1] >= self.n_passages:
            raise RetrievalInputError(
                f"subset rows must lie in [0, {self.n_passages}), got {rows[0]}..{rows[-1]}"
            )
        vectors = self._doc_vectors(rows[None, :])[0]  # (M, D)
        index = self._fresh_index().build(vectors)
        return DenseRetriever(
            index,
            [self.passages[r] for r in rows],
            self.query_encoder,
            doc_embeds=vectors,
            encode_batch_size=self.encode_batch_size,
        )

    def extended(self, passages: Sequence[Passage], embeds) -> DenseRetriever:
        """A copy whose index also holds ``passages``, their d(z) ``embeds`` (M, D) appended as new rows with
        ``DenseIndex.add`` (a growing knowledge base); this retriever is left as it is."""
        embeds = np.asarray(embeds.detach().cpu() if isinstance(embeds, torch.Tensor) else embeds, np.float32)
        if embeds.ndim != 2 or embeds.shape[0] != len(passages) or embeds.shape[1] != self.dim:
            raise RetrievalInputError(
                f"embeds must be ({len(passages)}, {self.dim}) for {len(passages)} passages, got "
                f"{tuple(embeds.shape)}: encode the new passages with the index's document encoder"
            )
        vectors = self.all_doc_vectors()
        index = self._fresh_index().build(vectors)
        index.add(embeds)
        return DenseRetriever(
            index,
            [*self.passages, *passages],
            self.query_encoder,
            doc_embeds=np.concatenate([vectors, embeds]),
            encode_batch_size=self.encode_batch_size,
        )

    def _doc_vectors(self, doc_ids: np.ndarray) -> np.ndarray:
        """Stored vectors of doc_ids (B, K) -> (B, K, D), float32."""
        if self.doc_embeds is None:
            return self.index.reconstruct(doc_ids)
        flat = doc_ids.reshape(-1)
        # memmaps read fastest in row order; gather the unique rows once
        unique, inverse = np.unique(flat, return_inverse=True)
        rows = np.asarray(self.doc_embeds[unique], dtype=np.float32)
        # the dimension, not -1: a rank of a sharded search may have no questions (an empty batch)
        return rows[inverse].reshape(*doc_ids.shape, self.dim)


def write_index_source(index_dir: str | os.PathLike, **record) -> None:
    """Record beside a saved index where its embeddings live (and what built it), atomically."""
    write_json_atomic(Path(index_dir) / SOURCE_NAME, record)


def read_index_source(index_dir: str | os.PathLike) -> dict:
    """What :func:`write_index_source` recorded, or {} for an index saved without it."""
    path = Path(index_dir).expanduser() / SOURCE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


class BM25Retriever(Retriever):
    """BM25 over title + text; ``doc_scores`` are the BM25 scores, used as logits (paper Table 6)."""

    kind = "bm25"

    def __init__(self, bm25: BM25Index, passages: Sequence[Passage]) -> None:
        super().__init__(passages)
        if bm25.n_passages != len(passages):
            raise RetrievalInputError(
                f"the BM25 index holds {bm25.n_passages} passages but {len(passages)} were given: rebuild it"
            )
        self.bm25 = bm25

    @classmethod
    def from_passages(
        cls,
        passages: Sequence[Passage],
        k1: float = 0.9,
        b: float = 0.4,
        stopwords: str | None = "english",
        index_dir: str | os.PathLike | None = None,
    ) -> BM25Retriever:
        """Build (or, when ``index_dir`` holds one for these passages, load) a BM25 index."""
        checksum = corpus_checksum(passages)
        if index_dir is not None and (Path(index_dir).expanduser() / "bm25_manifest.json").is_file():
            bm25 = BM25Index.load(
                index_dir, expected_corpus_checksum=checksum, expected_passages=len(passages)
            )
            if (bm25.k1, bm25.b, bm25.stopwords) == (k1, b, stopwords):
                return cls(bm25, passages)
        bm25 = BM25Index(k1=k1, b=b, stopwords=stopwords).build(passages, corpus_checksum=checksum)
        if index_dir is not None:
            bm25.save(index_dir)
        return cls(bm25, passages)

    def retrieve(self, questions: Sequence[str], n_docs: int) -> RetrievalOutput:
        questions = check_questions(questions)
        n_docs = check_n_docs(n_docs, self.n_passages, "the corpus")
        doc_scores, doc_ids = self.bm25.search(questions, n_docs)  # (B, K), (B, K)
        return RetrievalOutput(
            doc_ids=torch.from_numpy(doc_ids),
            doc_scores=torch.from_numpy(doc_scores),
            passages=self._passages_of(doc_ids),
        )


class GoldRetriever(Retriever):
    """The question's own gold passages (an oracle): the reader warm-up and the "given the gold passage"
    upper bound of an evaluation.

    ``retrieve(questions, n_docs)`` takes :class:`~rag.types.Question` records (it needs their
    ``gold_passage_ids``) and returns, for each, its first ``n_docs`` gold passages; a question with fewer
    repeats its last one, so that every row has K columns. ``doc_scores`` are zeros (a uniform p(z|x)):
    nothing is learned about retrieval in this mode.

    ``window_words`` (None: whole passages) crops each gold passage to that many words around the first
    occurrence of one of the question's answers, at an offset drawn from the question id (so the answer is
    not always in the middle); a passage without the answer keeps its first ``window_words`` words. Shorter
    inputs make the reader warm-up's steps cheaper and its attention easier to learn.
    """

    kind = "gold"

    def __init__(self, passages: Sequence[Passage], window_words: int | None = None) -> None:
        super().__init__(passages)
        if window_words is not None and (isinstance(window_words, bool) or int(window_words) < 1):
            raise RetrievalInputError(
                f"window_words must be a positive integer or None, got {window_words!r}"
            )
        self.window_words = None if window_words is None else int(window_words)
        self.row_of = {p.id: i for i, p in enumerate(passages)}

    @classmethod
    def from_passages(cls, passages: Sequence[Passage], window_words: int | None = None) -> GoldRetriever:
        return cls(passages, window_words=window_words)

    def crop(self, passage: Passage, question) -> Passage:
        """``passage`` cut to ``window_words`` words around the question's first answer found in it."""
        words = passage.text.split()
        n = self.window_words
        if n is None or len(words) <= n:
            return passage
        lowered = [w.lower() for w in words]
        start = None
        for answer in question.answers:
            target = answer.lower().split()
            if not target:
                continue
            first = re.escape(target[0])
            for i in range(len(words) - len(target) + 1):
                if re.match(first, lowered[i]) and all(
                    re.sub(r"\W", "", a) == re.sub(r"\W", "", b)
                    for a, b in zip(lowered[i + 1 : i + len(target)], target[1:])
                ):
                    start = i
                    break
            if start is not None:
                break
        if start is None:
            begin = 0
        else:
            slack = max(n - len(answer.split()), 0)
            begin = start - random.Random(question.id).randint(0, slack)
            begin = min(max(begin, 0), len(words) - n)
        return Passage(passage.id, passage.title, " ".join(words[begin : begin + n]))

    def retrieve(self, questions, n_docs: int) -> RetrievalOutput:
        from rag.types import Question

        if isinstance(questions, (str, Question)):
            raise RetrievalInputError(
                "pass a list of questions (one per batch element), not a single question"
            )
        n_docs = check_n_docs(n_docs, self.n_passages, "the corpus")
        rows = []
        for i, q in enumerate(questions):
            if not isinstance(q, Question):
                raise RetrievalInputError(
                    f"question {i} is a {type(q).__name__}: the gold retriever needs rag.types.Question records "
                    "(their gold_passage_ids), not bare strings"
                )
            if not q.gold_passage_ids:
                raise RetrievalInputError(
                    f"question {q.id!r} has no gold passage: retriever=gold needs question sets with gold "
                    "passage ids (mini-wiki SQuAD-open / NQ-gold, cloze questions); use a dense or BM25 retriever"
                )
            missing = [pid for pid in q.gold_passage_ids if pid not in self.row_of]
            if missing:
                raise RetrievalInputError(
                    f"question {q.id!r} names gold passage {missing[0]!r}, which is not in the corpus: use the "
                    "corpus the question set was built on"
                )
            ids = [self.row_of[pid] for pid in q.gold_passage_ids[:n_docs]]
            rows.append(ids + ids[-1:] * (n_docs - len(ids)))
        doc_ids = np.asarray(rows, dtype=np.int64)  # (B, K)
        passages = self._passages_of(doc_ids)
        if self.window_words is not None:
            passages = [[self.crop(p, q) for p in row] for row, q in zip(passages, questions)]
        return RetrievalOutput(
            doc_ids=torch.from_numpy(doc_ids),
            doc_scores=torch.zeros(doc_ids.shape, dtype=torch.float32),  # (B, K)
            passages=passages,
        )
