"""Retrieval quality on question sets: answer recall@k and gold-passage recall@k of any retrievers, and how
often approximate indexes find what exact search finds (``rag-eval-retrieval``'s figures).

    rows, index_recall = evaluate_retrievers(retrievers, question_sets, ks, query_encoder)
    print(markdown_tables(rows, ks))

- answer recall@k (DPR's top-k retrieval accuracy): the fraction of questions with a gold answer string
  among the texts of their top-k passages (``rag.metrics.has_answer``);
- gold-passage recall@k: the fraction with the passage the question was written on among the top k
  (questions without gold passages are skipped and counted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from rag.errors import ConfigError
from rag.metrics import answer_recall_at_k, gold_recall_at_k, gold_recall_counts
from rag.retrieval.embed import EmbeddingsError, open_embeddings
from rag.retrieval.exact import recall_vs_exact
from rag.retrieval.indexer import ensure_index
from rag.retrieval.retriever import DenseRetriever, Retriever
from rag.types import Question

__all__ = [
    "evaluate",
    "evaluate_retrievers",
    "indexed_retriever",
    "json_default",
    "json_rows",
    "markdown_tables",
]

log = logging.getLogger(__name__)


def evaluate(
    retriever: Retriever,
    questions: list[Question],
    ks: list[int],
    question_embeds: torch.Tensor | None = None,
) -> dict:
    """Recall figures of one retriever on one question set (top max(ks) passages per question)."""
    n_docs = min(max(ks), retriever.n_passages)
    texts = [q.question for q in questions]
    start = time.perf_counter()
    if question_embeds is not None:
        out = retriever.retrieve_by_embeds(question_embeds, n_docs)
    else:
        out = retriever.retrieve(texts, n_docs)
    seconds = time.perf_counter() - start
    regex = {q.answers_are_regex for q in questions}
    if len(regex) > 1:
        raise ConfigError("a question set mixes regex and string answers: split it into two sets")
    retrieved_texts = [[p.text for p in row] for row in out.passages]
    retrieved_ids = [[p.id for p in row] for row in out.passages]
    gold_ids = [q.gold_passage_ids for q in questions]
    scored, skipped = gold_recall_counts(gold_ids)
    return {
        "n_questions": len(questions),
        "answer_recall": answer_recall_at_k(
            retrieved_texts, [q.answers for q in questions], ks, regex=regex.pop()
        ),
        "gold_recall": gold_recall_at_k(retrieved_ids, gold_ids, ks) if scored else None,
        "gold_scored": scored,
        "gold_skipped": skipped,
        "search_seconds": seconds,
    }


def indexed_retriever(
    passages, doc_encoder, query_encoder, index, index_dir, embeddings_dir, **ensure
) -> DenseRetriever:
    """A dense retriever over ``index`` loaded from ``index_dir`` or built first (:func:`rag.retrieval.indexer.
    ensure_index` with ``ensure``'s settings), scoring with the stored embeddings when they are usable."""
    result = ensure_index(passages, doc_encoder, index, index_dir, embeddings_dir, **ensure)
    try:
        doc_embeds = open_embeddings(result.embeddings_dir, expected_rows=len(passages))
    except EmbeddingsError as err:
        # the index alone still serves: its own vectors (exact for flat and hnsw) stand in
        log.info(f"stored embeddings unusable ({err}); using the vectors held by the {index.kind} index")
        doc_embeds = None
    return DenseRetriever(result.index, passages, query_encoder, doc_embeds=doc_embeds)


def evaluate_retrievers(
    retrievers: Mapping[str, Retriever],
    question_sets: Mapping[str, list[Question]],
    ks: list[int],
    query_encoder=None,
    dense_indexes: Mapping | None = None,
    query_batch_size: int = 128,
) -> tuple[list[dict], dict]:
    """:func:`evaluate` of every retriever on every question set, the questions encoded once per set for all
    dense retrievers; and, per set, the recall of every approximate index of ``dense_indexes`` against the
    exact one among them. Returns the rows (``questions``, ``retriever`` and the figures) and those recalls
    (``<set>/<index name>`` -> recall@k)."""
    dense_indexes = dict(dense_indexes or {})
    rows, index_recall = [], {}
    with torch.inference_mode():
        for set_name, questions in question_sets.items():
            question_embeds, encode_seconds = None, None
            if dense_indexes:
                start = time.perf_counter()
                question_embeds = query_encoder.encode(
                    [q.question for q in questions], batch_size=query_batch_size
                )
                encode_seconds = time.perf_counter() - start
            for name, retriever in retrievers.items():
                dense = isinstance(retriever, DenseRetriever)
                row = evaluate(retriever, questions, ks, question_embeds if dense else None)
                if dense:
                    row["encode_seconds"] = encode_seconds
                rows.append({"questions": set_name, "retriever": name, **row})
                log.info(
                    f"{set_name} / {name}: answer recall@{ks[-1]} {row['answer_recall'][ks[-1]]:.3f} "
                    f"({len(questions) / max(row['search_seconds'], 1e-9):.0f} questions/s search)"
                )
            approximate = {n: i for n, i in dense_indexes.items() if not i.is_exact}
            exact = next((i for i in dense_indexes.values() if i.is_exact), None)
            if exact is not None and approximate:
                queries = question_embeds.float().cpu().numpy()
                for name, index in approximate.items():
                    rec = recall_vs_exact(index, exact, queries, k=ks)
                    index_recall[f"{set_name}/{name}"] = rec
                    shown = " ".join(f"@{k.split('@')[1]} {v:.3f}" for k, v in rec.items() if "@" in k)
                    log.info(f"{name} recall vs exact search on the {set_name} questions: {shown}")
    return rows, index_recall


def markdown_tables(rows: Sequence[dict], ks: list[int]) -> str:
    """Two markdown tables (answer recall@k, gold-passage recall@k), percentages with one decimal."""
    header = "| questions | n | retriever | " + " | ".join(f"@{k}" for k in ks) + " |"
    rule = "|---|---:|---|" + "---:|" * len(ks)
    parts = []
    for key, title in (
        ("answer_recall", "Answer recall@k (% of questions with a gold answer in the top-k passages)"),
        ("gold_recall", "Gold-passage recall@k (% of questions with their gold passage in the top k)"),
    ):
        lines = [f"**{title}**", "", header, rule]
        for row in rows:
            values = row[key]
            cells = [f"{100 * values[k]:.1f}" if values else "-" for k in ks]
            lines.append(
                f"| {row['questions']} | {row['n_questions']} | {row['retriever']} | "
                + " | ".join(cells)
                + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def json_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows with their recall@k keys as strings (``{1: 0.5}`` -> ``{"1": 0.5}``), as JSON keeps them."""

    def keys(values: dict | None) -> dict | None:
        return None if values is None else {str(k): v for k, v in values.items()}

    return [
        {**r, "answer_recall": keys(r["answer_recall"]), "gold_recall": keys(r["gold_recall"])} for r in rows
    ]


def json_default(value):
    """``json.dumps(..., default=json_default)``: numpy scalars as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
